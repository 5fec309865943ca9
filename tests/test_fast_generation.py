"""The fast (static-cache) generation engines against their references, on CPU, where the same step functions
run without CUDA graphs: the block model's fast engine against its eager engine, the vanilla static engine
against transformers' `generate`, the static buffers against caches built by teacher forcing, and rows that
join a running batch against each prompt alone."""

import pytest
import torch
from conftest import load_block_model, padded_positions
from families import FAMILIES
from transformers import DynamicCache

from uptrain.generation_block_transformer import (
    BlockEngine,
    BlockPrompt,
    EngineShape,
    GenerationRequest,
    Unsupported,
    buckets,
    cache_argument,
    engine_of,
)
from uptrain.vanilla_engine import VanillaEngine, VanillaPrompt, generate_static

BLOCK = 4
ROWS = (3, 9, 5, 1, 4, 7)  # left-padded prompts: shorter than a block, whole blocks, partial blocks


def left_padded(lengths, seed=5, pad=3):
    torch.manual_seed(seed)
    rows = [torch.randint(4, 128, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def both(model, ids, mask, seed=None, **kwargs):
    """(eager, fast) outputs of the same call; with `seed`, each starts from the same generator state."""
    outputs = []
    for engine in ("eager", "fast"):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(ids, attention_mask=mask, engine=engine, **kwargs))
    return outputs


@pytest.mark.parametrize("family", FAMILIES)  # every family hands the plan to its attention function
def test_fast_greedy_equals_eager_left_padded(family, model_of):
    model = model_of(family)
    ids, mask = left_padded(ROWS)
    eager, fast = both(model, ids, mask, max_new_tokens=11, do_sample=False, eos_token_id=None)
    assert fast.shape == (len(ROWS), ids.shape[1] + 11)
    assert torch.equal(fast, eager)
    short, short_mask = left_padded((1, 3, 2), seed=6)  # no whole block at all: no prefill
    eager, fast = both(model, short, short_mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(fast, eager)


def test_fast_eos_in_the_middle_and_min_new_tokens(model_of):
    model = model_of("llama")
    ids, mask = left_padded(ROWS, seed=7)
    width, new = ids.shape[1], 13
    free = model.generate(
        ids, attention_mask=mask, engine="eager", max_new_tokens=new, do_sample=False, eos_token_id=None
    )[:, width:]
    eos = int(free[0, 2])  # row 0 meets it at its third token at the latest; other rows maybe, maybe never
    eager, fast = both(model, ids, mask, max_new_tokens=new, do_sample=False, eos_token_id=[eos, 127], pad_token_id=0)
    assert torch.equal(fast, eager)
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(fast[0, width : width + first + 1], free[0, : first + 1])
    assert (fast[0, width + first + 1 :] == 0).all()  # the finished row keeps padding
    assert any((fast[row, width:] != 0).all() for row in range(1, len(ROWS)))  # some row runs to the end

    eager, fast = both(
        model,
        ids,
        mask,
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        min_new_tokens=first + 2,
    )
    assert torch.equal(fast, eager)
    assert (fast[0, width : width + first + 2] != eos).all()


def test_fast_stops_once_every_row_is_done(model_of):
    model = model_of("qwen2")
    ids, mask = left_padded((4, 6), seed=8)
    width, new = ids.shape[1], 24
    free = model.generate(
        ids, attention_mask=mask, engine="eager", max_new_tokens=new, do_sample=False, eos_token_id=None
    )[:, width:]
    eos = [int(free[0, 1]), int(free[1, 1])]  # both rows stop within their first few tokens
    calls = {}
    for engine in ("eager", "fast"):
        seen = []
        handle = model.block_decoder.register_forward_pre_hook(lambda *args, seen=seen: seen.append(1))
        try:
            calls[engine] = (
                model.generate(
                    ids,
                    attention_mask=mask,
                    engine=engine,
                    max_new_tokens=new,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=0,
                ),
                len(seen),
            )
        finally:
            handle.remove()
    assert torch.equal(calls["fast"][0], calls["eager"][0])
    steps = -(-(new + 2) // BLOCK)  # block steps when no row stops: the prefill, then steps - 1 block-decoder calls
    assert calls["eager"][1] < steps
    assert calls["fast"][1] <= calls["eager"][1] + 1  # the fast engine looks at the flag after the block step


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
def test_fast_sampling_same_generator_state_same_tokens(family, model_of):
    model = model_of(family)
    ids, mask = left_padded(ROWS, seed=9)
    settings = {
        "max_new_tokens": 10,
        "do_sample": True,
        "temperature": 1.5,
        "top_p": 0.9,
        "top_k": 50,
        "eos_token_id": None,
    }
    eager, fast = both(model, ids, mask, seed=11, **settings)
    assert torch.equal(fast, eager)
    _, again = both(model, ids, mask, seed=12, **settings)
    assert not torch.equal(again, fast)  # another seed, other tokens
    greedy = model.generate(
        ids, attention_mask=mask, engine="fast", max_new_tokens=10, do_sample=False, eos_token_id=None
    )
    assert not torch.equal(fast, greedy)
    top1 = model.generate(
        ids, attention_mask=mask, engine="fast", max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None
    )
    assert torch.equal(top1, greedy)
    eager, plain = both(model, ids, mask, seed=13, max_new_tokens=10, do_sample=True, eos_token_id=None)  # no warper
    assert torch.equal(plain, eager) and not torch.equal(plain, greedy)  # do_sample alone samples


def test_sampling_follows_the_distribution(model_of):
    """The exponential race draws token i with probability p_i: first-token frequencies over 3,000 rows against
    the softmax of the teacher-forced logits, by a chi-square statistic (bins expected >= 5, the rest in one;
    about `bins` when right; on this model 107 for 123 bins, 267 if sampled at temperature 0.35, 1,105 at 1)."""
    model = model_of("llama")
    prompt = torch.randint(4, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = torch.softmax(model(prompt).logits[0, -1].double() / 0.25, -1)
    torch.manual_seed(0)
    rows = 3000
    first = model.generate(
        prompt.expand(rows, -1), engine="fast", max_new_tokens=1, do_sample=True, temperature=0.25, eos_token_id=None
    )[:, -1]
    counts = torch.bincount(first, minlength=probs.numel()).double()
    expected = rows * probs
    big = expected >= 5
    observed, wanted = counts[big], expected[big]
    if not big.all():
        observed, wanted = (
            torch.cat([observed, counts[~big].sum()[None]]),
            torch.cat([wanted, expected[~big].sum()[None]]),
        )
    bins = len(wanted)
    assert bins >= 10
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    assert chi2 < bins + 5 * (2 * bins) ** 0.5, (chi2, bins)  # five standard deviations


def test_engine_is_kept_for_the_same_shape_and_released(model_of):
    model = model_of("llama")
    ids, mask = left_padded(ROWS)
    settings = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None}
    first = model.generate(ids, attention_mask=mask, engine="fast", **settings)
    engine = engine_of(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, engine="fast", **settings), first)
    assert engine_of(model) is engine  # reused: buffers reset, not reallocated
    model.generate(ids[:2], attention_mask=mask[:2], engine="fast", **settings)
    assert engine_of(model) is not engine
    model.release_generation_engine()
    assert engine_of(model) is None
    with pytest.raises(ValueError, match="engine must be one of"):
        model.generate(ids, engine="turbo")


def test_a_layer_outside_the_attention_interface_is_detected(converted):
    """The fast engine refuses a decoder whose layers do not all write their keys and values where the plan says:
    a layer with its own attention implementation, or one that drops the decoder's keyword arguments. The
    engine is discarded and the model left as it was (the eager engine still gives its tokens)."""
    model = load_block_model(converted("llama"))
    ids, mask = left_padded((5, 7), seed=3)
    settings = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    expected = model.generate(ids, attention_mask=mask, engine="eager", **settings)
    attention = model.token_decoder.model.layers[1].self_attn
    config, forward = attention.config, attention.forward
    attention.config = type(config).from_dict(config.to_dict())  # its own config: the switch does not reach it
    layers = len(model.token_decoder.model.layers)
    with pytest.raises(Unsupported, match=f"{layers - 1} of {layers} layers went through the attention interface"):
        model.generate(ids, attention_mask=mask, engine="fast", **settings)
    assert engine_of(model) is None
    attention.config = config
    attention.forward = lambda *args, kv_plan=None, **kwargs: forward(*args, **kwargs)
    with pytest.raises(Unsupported, match="does not hand the decoder's keyword arguments to its attention"):
        model.generate(ids, attention_mask=mask, engine="fast", **settings)
    del attention.forward
    assert model.token_decoder.config._attn_implementation == model.config.token_decoder._attn_implementation
    assert torch.equal(model.generate(ids, attention_mask=mask, engine="eager", **settings), expected)
    assert torch.equal(model.generate(ids, attention_mask=mask, engine="fast", **settings), expected)


def test_rows_join_a_running_block_batch_and_get_their_tokens_alone(model_of):
    """Serving's primitive: a prompt prefilled into a free row of a running engine, between two blocks, generates
    what it generates alone; the row that started first is not disturbed, and stops moving once done. Sliding
    windows (gemma3_text's 6 slots) count each row's own slots."""
    model = model_of("gemma3_text")
    first, second = (
        torch.randint(4, 128, (1, 22), generator=torch.Generator().manual_seed(1)),
        torch.randint(4, 128, (1, 9), generator=torch.Generator().manual_seed(2)),
    )
    new = 17
    settings = {"max_new_tokens": new, "do_sample": False, "eos_token_id": None}
    alone = [model.generate(ids, engine="eager", **settings)[0, ids.shape[1] :] for ids in (first, second)]
    rules = GenerationRequest.of(model, first, kwargs=settings).rules
    slots = 32
    with BlockEngine.open(model, EngineShape(batch=3, slots=slots, visible=(slots,)), rules) as engine:
        assert bool(engine.done)  # a new engine's rows hold no prompt
        engine.prefill(BlockPrompt.lay_out(first, torch.ones_like(first), BLOCK, new), rows=torch.tensor([2]))
        for _ in range(3):
            engine.advance(slots)
        engine.prefill(BlockPrompt.lay_out(second, torch.ones_like(second), BLOCK, new), rows=torch.tensor([0]))
        rounds = 0
        while not bool(engine.done):
            engine.advance(slots)
            rounds += 1
        assert rounds == -(-(new + 1) // BLOCK)  # the second prompt's blocks: its partial one, then the new tokens
        assert torch.equal(engine.tokens[2], alone[0]) and torch.equal(engine.tokens[0], alone[1])
        assert engine.write_slot.tolist() == [2 + rounds - 1, 0, 5 + -(-(new + 2) // BLOCK) - 1]  # row 1 never started


def test_rows_join_a_running_vanilla_batch_and_get_their_tokens_alone(tiny_source):
    _, model = tiny_source("qwen2")
    first, second = (
        torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(1)),
        torch.randint(4, 128, (1, 8), generator=torch.Generator().manual_seed(2)),
    )
    new = 10
    settings = {"max_new_tokens": new, "do_sample": False, "eos_token_id": None, "pad_token_id": 3}
    alone = [model.generate(ids, **settings)[0, ids.shape[1] :] for ids in (first, second)]
    rules = GenerationRequest.of(model, first, kwargs=settings).rules
    slots = 32
    with VanillaEngine.open(model, EngineShape(batch=2, slots=slots, visible=(slots,)), rules) as engine:
        engine.prefill(VanillaPrompt(first, torch.ones_like(first), new), rows=torch.tensor([1]))
        for _ in range(4):
            engine.advance(slots)
        engine.prefill(VanillaPrompt(second, torch.ones_like(second), new), rows=torch.tensor([0]))
        for _ in range(new - 1):
            engine.advance(slots)
        assert bool(engine.done)
        assert torch.equal(engine.tokens[1], alone[0]) and torch.equal(engine.tokens[0], alone[1])
        assert engine.write_slot.tolist() == [8 + new - 2, 5 + new - 2]  # done rows stop at their last token's slot


def test_static_buffers_hold_what_teacher_forcing_caches(model_of):
    """After a run: the block decoder's slots hold the keys a dynamic cache gets from the whole re-laid sequence
    of blocks (prompt blocks with padding blocks masked, then every generated block but the last), zeros in
    padding slots; the token decoder's window holds the last block's keys and values; the slot and position
    counters moved one a block step."""
    model = model_of("llama")
    lengths = (8, 4, 12)  # whole blocks only, so that every token of the last block is in the output
    ids, mask = left_padded(lengths, seed=4)
    width, new = ids.shape[1], 12
    output = model.generate(
        ids, attention_mask=mask, engine="fast", max_new_tokens=new, do_sample=False, eos_token_id=None
    )
    engine = engine_of(model)
    prompt = BlockPrompt.lay_out(ids, mask, BLOCK, new)
    slots = prompt.blocks + prompt.steps - 1
    assert engine.shape.slots == slots and (engine.write_slot == slots).all()
    assert torch.equal(engine.block_position[:, 0], prompt.whole + prompt.steps - 1)
    valid = torch.cat([prompt.block_mask.bool(), torch.ones(3, prompt.steps - 1, dtype=torch.bool)], dim=1)  # (B, S)
    assert torch.equal(engine.key_valid, valid)

    laid = torch.zeros(3, (slots + 1) * BLOCK, dtype=torch.long)  # each row from its first real block, right-aligned
    for row, length in enumerate(lengths):
        laid[row, (prompt.blocks - length // BLOCK) * BLOCK :] = output[row, width - length :]
    cache = DynamicCache(config=model.config.block_decoder)
    with torch.no_grad():
        hidden = model.block_decoder(
            inputs_embeds=model.embed_blocks(laid[:, : slots * BLOCK]),
            attention_mask=valid.long(),
            position_ids=padded_positions(valid.long()),
            use_cache=True,
            **{cache_argument(model.block_decoder): cache},
        ).last_hidden_state
    spread = valid[:, None, :, None]
    for layer in range(model.config.block_decoder.num_hidden_layers):
        static, keys = engine.block_kv.keys[layer], cache.layers[layer].keys  # (B, H_kv, S, d)
        assert torch.allclose(static[spread.expand_as(static)], keys[spread.expand_as(keys)], atol=1e-5)
        assert (static[~spread.expand_as(static)] == 0).all()

    last = laid[:, slots * BLOCK :]  # the last block, decoded from the context of the last slot
    assert torch.equal(engine.block, last)
    window = torch.cat(
        [model.prefix_inputs(hidden[:, -1]), model.token_decoder.get_input_embeddings()(last[:, :-1])], 1
    )
    cache = DynamicCache(config=model.config.token_decoder)
    with torch.no_grad():
        model.token_decoder.base_model(
            inputs_embeds=window,
            position_ids=model.window_position_ids("cpu")[None].expand(3, -1),
            use_cache=True,
            **{cache_argument(model.token_decoder): cache},
        )
    for layer in range(model.config.token_decoder.num_hidden_layers):
        assert torch.allclose(engine.token_kv.keys[layer], cache.layers[layer].keys, atol=1e-5)
        assert torch.allclose(engine.token_kv.values[layer], cache.layers[layer].values, atol=1e-5)


def test_buckets():
    assert buckets(first=5, count=4, total=40, size=4) == [8, 8, 8, 12]  # slots 5..8 -> visible 6..9 rounded up
    assert buckets(first=0, count=3, total=2, size=32) == [2, 2, 2]  # never past the buffer
    assert buckets(first=3, count=0, total=3) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_static_engine_equals_transformers_greedy(family, tiny_source):
    _, model = tiny_source(family)
    ids, mask = left_padded(ROWS, seed=10)
    settings = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "pad_token_id": 3}
    expected = model.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(generate_static(model, ids, attention_mask=mask, **settings), expected)


def test_vanilla_static_engine_eos_and_min_new_tokens(tiny_source):
    _, model = tiny_source("qwen2")
    ids, mask = left_padded(ROWS, seed=12)
    width = ids.shape[1]
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=3
    )
    eos = int(free[0, width + 1])
    for extra in ({}, {"min_new_tokens": 4}):
        settings = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0, **extra)
        expected = model.generate(ids, attention_mask=mask, **settings)  # may stop early: pad to the full length
        expected = torch.nn.functional.pad(expected, (0, width + 10 - expected.shape[1]), value=0)
        assert torch.equal(generate_static(model, ids, attention_mask=mask, **settings), expected)


@pytest.mark.slow
def test_compiled_steps_give_the_same_tokens_in_one_graph_each(model_of, tiny_source, monkeypatch):
    """compile_steps: the step functions through torch.compile give the uncompiled engines' tokens, with EOS
    and left padding, and dynamo traces each whole, without a graph break (a break would split the fused
    kernels and, on CUDA, the captured step), and all before the capture: the warm-up compiles, the steps
    only run (a compile inside a CUDA-graph capture invalidates it). The backend is aot_eager here: dynamo's
    tracing and the functionalised mutations of the engine's buffers are what can go wrong on any device, and inductor's
    code generation takes minutes on CPU; the GPU script checks inductor's tokens (docs/results/token-agreement.md)."""
    from torch._dynamo.utils import counters

    from uptrain.generation_block_transformer import StepGraphs

    monkeypatch.setattr(StepGraphs, "COMPILE_ARGUMENTS", {"backend": "aot_eager"})
    compiled_in_steps = []  # on CUDA the steps replay captures: a compile there would have invalidated one
    run = StepGraphs.run

    def watched_run(self, key):
        before = counters["stats"]["unique_graphs"]
        run(self, key)
        if counters["stats"]["unique_graphs"] != before:
            compiled_in_steps.append(key)

    monkeypatch.setattr(StepGraphs, "run", watched_run)
    counters.clear()
    model = model_of("llama")
    ids, mask = left_padded(ROWS, seed=7)
    settings = {"max_new_tokens": 13, "do_sample": False, "eos_token_id": [int(ids[0, -1]), 127], "pad_token_id": 0}
    expected = model.generate(ids, attention_mask=mask, engine="fast", **settings)
    compiled = model.generate(ids, attention_mask=mask, engine="fast", compile_steps=True, **settings)
    assert torch.equal(compiled, expected)
    _, vanilla = tiny_source("llama")
    expected = generate_static(vanilla, ids, attention_mask=mask, **settings)
    assert torch.equal(generate_static(vanilla, ids, attention_mask=mask, compile_steps=True, **settings), expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 3  # the token block, a block step, a vanilla step: compiled
    assert not compiled_in_steps, f"compiled after the warm-up, in {compiled_in_steps}"
