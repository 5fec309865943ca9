"""The fast (static-cache) generation engines against their references, on CPU, where the same step functions
run without CUDA graphs: the block model's fast engine against its eager engine, the vanilla static engine
against transformers' `generate`, and the static buffers against caches built by teacher forcing."""

import pytest
import torch
from conftest import padded_positions
from transformers import DynamicCache

from uptrain.generation_block_transformer import _ENGINES, _cache_argument, buckets
from uptrain.vanilla_engine import generate_static

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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])  # rotary+GQA, learned positions, sliding windows
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
    free = model.generate(ids, attention_mask=mask, engine="eager", max_new_tokens=new, do_sample=False, eos_token_id=None)[:, width:]
    eos = int(free[0, 2])  # row 0 meets it at its third token at the latest; other rows maybe, maybe never
    eager, fast = both(model, ids, mask, max_new_tokens=new, do_sample=False, eos_token_id=[eos, 127], pad_token_id=0)
    assert torch.equal(fast, eager)
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(fast[0, width : width + first + 1], free[0, : first + 1])
    assert (fast[0, width + first + 1 :] == 0).all()  # the finished row keeps padding
    assert any((fast[row, width:] != 0).all() for row in range(1, len(ROWS)))  # some row runs to the end

    eager, fast = both(model, ids, mask, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0,
                       min_new_tokens=first + 2)
    assert torch.equal(fast, eager)
    assert (fast[0, width : width + first + 2] != eos).all()


def test_fast_stops_once_every_row_is_done(model_of):
    model = model_of("qwen2")
    ids, mask = left_padded((4, 6), seed=8)
    width, new = ids.shape[1], 24
    free = model.generate(ids, attention_mask=mask, engine="eager", max_new_tokens=new, do_sample=False, eos_token_id=None)[:, width:]
    eos = [int(free[0, 1]), int(free[1, 1])]  # both rows stop within their first few tokens
    calls = {}
    for engine in ("eager", "fast"):
        seen = []
        handle = model.block_decoder.register_forward_pre_hook(lambda *args, seen=seen: seen.append(1))
        try:
            calls[engine] = model.generate(ids, attention_mask=mask, engine=engine, max_new_tokens=new, do_sample=False,
                                           eos_token_id=eos, pad_token_id=0), len(seen)
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
    settings = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 50, "eos_token_id": None}
    eager, fast = both(model, ids, mask, seed=11, **settings)
    assert torch.equal(fast, eager)
    _, again = both(model, ids, mask, seed=12, **settings)
    assert not torch.equal(again, fast)  # another seed, other tokens
    greedy = model.generate(ids, attention_mask=mask, engine="fast", max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert not torch.equal(fast, greedy)
    top1 = model.generate(ids, attention_mask=mask, engine="fast", max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None)
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
    first = model.generate(prompt.expand(rows, -1), engine="fast", max_new_tokens=1, do_sample=True, temperature=0.25,
                           eos_token_id=None)[:, -1]
    counts = torch.bincount(first, minlength=probs.numel()).double()
    expected = rows * probs
    big = expected >= 5
    observed, wanted = counts[big], expected[big]
    if not big.all():
        observed, wanted = torch.cat([observed, counts[~big].sum()[None]]), torch.cat([wanted, expected[~big].sum()[None]])
    bins = len(wanted)
    assert bins >= 10
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    assert chi2 < bins + 5 * (2 * bins) ** 0.5, (chi2, bins)  # five standard deviations


def test_engine_is_kept_for_the_same_shape_and_released(model_of):
    model = model_of("llama")
    ids, mask = left_padded(ROWS)
    settings = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None}
    first = model.generate(ids, attention_mask=mask, engine="fast", **settings)
    engine = _ENGINES[model]
    assert torch.equal(model.generate(ids, attention_mask=mask, engine="fast", **settings), first)
    assert _ENGINES[model] is engine  # reused: buffers reset, not reallocated
    model.generate(ids[:2], attention_mask=mask[:2], engine="fast", **settings)
    assert _ENGINES[model] is not engine
    model.release_generation_engine()
    assert model not in _ENGINES
    with pytest.raises(ValueError, match="engine must be one of"):
        model.generate(ids, engine="turbo")


def test_static_buffers_hold_what_teacher_forcing_caches(model_of):
    """After a run: the block decoder's slots hold the keys a dynamic cache gets from the whole re-laid sequence
    of blocks (prompt blocks with padding blocks masked, then every generated block but the last), zeros in
    padding slots; the token decoder's window holds the last block's keys and values; the slot and position
    counters moved one a block step."""
    model = model_of("llama")
    lengths = (8, 4, 12)  # whole blocks only, so that every token of the last block is in the output
    ids, mask = left_padded(lengths, seed=4)
    width, new = ids.shape[1], 12
    output = model.generate(ids, attention_mask=mask, engine="fast", max_new_tokens=new, do_sample=False, eos_token_id=None)
    engine = _ENGINES[model]
    prompt = model._lay_out_prompt(ids, mask, new)
    slots = prompt.blocks + prompt.steps - 1
    assert engine.slots == slots and int(engine.write_slot) == slots
    assert torch.equal(engine.block_position[:, 0], prompt.whole + prompt.steps - 1)
    valid = torch.cat([prompt.block_mask.bool(), torch.ones(3, prompt.steps - 1, dtype=torch.bool)], dim=1)  # (B, S)
    assert torch.equal(engine.key_valid, valid)

    laid = torch.zeros(3, (slots + 1) * BLOCK, dtype=torch.long)  # each row from its first real block, right-aligned
    for row, length in enumerate(lengths):
        laid[row, (prompt.blocks - length // BLOCK) * BLOCK :] = output[row, width - length :]
    cache = DynamicCache(config=model.config.block_decoder)
    with torch.no_grad():
        hidden = model.block_decoder(
            inputs_embeds=model.embed_blocks(laid[:, : slots * BLOCK]), attention_mask=valid.long(),
            position_ids=padded_positions(valid.long()), use_cache=True, **{_cache_argument(model.block_decoder): cache},
        ).last_hidden_state
    spread = valid[:, None, :, None]
    for layer in range(model.config.block_decoder.num_hidden_layers):
        static, keys = engine.block_kv.keys[layer], cache.layers[layer].keys  # (B, H_kv, S, d)
        assert torch.allclose(static[spread.expand_as(static)], keys[spread.expand_as(keys)], atol=1e-5)
        assert (static[~spread.expand_as(static)] == 0).all()

    last = laid[:, slots * BLOCK :]  # the last block, decoded from the context of the last slot
    assert torch.equal(engine.block, last)
    window = torch.cat([model.prefix_inputs(hidden[:, -1]), model.token_decoder.get_input_embeddings()(last[:, :-1])], 1)
    cache = DynamicCache(config=model.config.token_decoder)
    with torch.no_grad():
        model.token_decoder.base_model(inputs_embeds=window, position_ids=model.window_position_ids("cpu")[None].expand(3, -1),
                                       use_cache=True, **{_cache_argument(model.token_decoder): cache})
    for layer in range(model.config.token_decoder.num_hidden_layers):
        assert torch.allclose(engine.token_kv.keys[layer], cache.layers[layer].keys, atol=1e-5)
        assert torch.allclose(engine.token_kv.values[layer], cache.layers[layer].values, atol=1e-5)


def test_buckets():
    assert buckets(first=5, count=4, total=40, size=4) == [8, 8, 8, 12]  # slots 5..8 -> visible 6..9 rounded up
    assert buckets(first=0, count=3, total=2, size=32) == [2, 2, 2]  # never past the buffer
    assert buckets(first=3, count=0, total=3) == []


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
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
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=3)
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
    only run (a compile inside a CUDA-graph capture invalidates it). The backend is aot_eager here: dynamo's tracing and the
    functionalised mutations of the engine's buffers are what can go wrong on any device, and inductor's
    code generation takes minutes on CPU; the GPU script checks inductor's tokens (docs/benchmarks.md)."""
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
    settings = dict(max_new_tokens=13, do_sample=False, eos_token_id=[int(ids[0, -1]), 127], pad_token_id=0)
    expected = model.generate(ids, attention_mask=mask, engine="fast", **settings)
    compiled = model.generate(ids, attention_mask=mask, engine="fast", compile_steps=True, **settings)
    assert torch.equal(compiled, expected)
    _, vanilla = tiny_source("llama")
    expected = generate_static(vanilla, ids, attention_mask=mask, **settings)
    assert torch.equal(generate_static(vanilla, ids, attention_mask=mask, compile_steps=True, **settings), expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 3  # the token block, a block step, a vanilla step: compiled
    assert not compiled_in_steps, f"compiled after the warm-up, in {compiled_in_steps}"
