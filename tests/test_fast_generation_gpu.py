"""The fast engines on a CUDA device, where their steps are captured as CUDA graphs (or compiled by inductor
first): the same tokens as the eager engine and transformers' `generate`, as each prompt alone when rows join a
running batch, and the same again from the compiled steps. Skipped where there is no CUDA device."""

import pytest
import torch
from conftest import load_block_model
from families import FAMILIES
from test_fast_generation import ROWS, left_padded

from uptrain.generation_block_transformer import BlockEngine, BlockPrompt, EngineShape, GenerationRequest, engine_of
from uptrain.vanilla_engine import VanillaEngine, VanillaPrompt, generate_static

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
BLOCK = 4


def on_device(ids, mask):
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_steps_give_the_eager_engines_tokens(family, converted, tiny_source):
    model = load_block_model(converted(family)).to(DEVICE)
    ids, mask = on_device(*left_padded((*ROWS, 30, 22)))
    greedy = {"max_new_tokens": 41, "do_sample": False, "eos_token_id": None}
    eager = model.generate(ids, attention_mask=mask, engine="eager", **greedy)
    assert torch.equal(model.generate(ids, attention_mask=mask, engine="fast", **greedy), eager)
    assert engine_of(model).graphs.graphs  # captured, not the uncaptured fallback
    assert torch.equal(model.generate(ids, attention_mask=mask, engine="fast", **greedy), eager)  # replayed again
    stop = {**greedy, "eos_token_id": [int(eager[0, ids.shape[1] + 2]), 127], "pad_token_id": 0}
    assert torch.equal(
        model.generate(ids, attention_mask=mask, engine="fast", **stop),
        model.generate(ids, attention_mask=mask, engine="eager", **stop),
    )
    sampled = {"max_new_tokens": 21, "do_sample": True, "temperature": 1.5, "top_p": 0.9, "eos_token_id": None}
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(model.generate(ids, attention_mask=mask, engine="fast", **sampled))
    assert torch.equal(*runs)
    model.release_generation_engine()

    _, source = tiny_source(family)
    vanilla = source.to(DEVICE)
    settings = {"max_new_tokens": 17, "do_sample": False, "eos_token_id": None, "pad_token_id": 3}
    try:
        assert torch.equal(
            generate_static(vanilla, ids, attention_mask=mask, **settings),
            vanilla.generate(ids, attention_mask=mask, **settings),
        )
    finally:
        source.to("cpu")


def test_rows_join_a_running_batch_of_captured_steps(converted, tiny_source):
    model = load_block_model(converted("gemma3_text")).to(DEVICE)
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(4, 128, (1, n), generator=generator).to(DEVICE) for n in (22, 9))
    new, slots = 17, 32
    settings = {"max_new_tokens": new, "do_sample": False, "eos_token_id": None}
    alone = [model.generate(ids, engine="eager", **settings)[0, ids.shape[1] :] for ids in (first, second)]
    rules = GenerationRequest.of(model, first, kwargs=settings).rules
    with BlockEngine.open(model, EngineShape(3, slots, (slots,)), rules) as engine:
        assert engine.graphs.graphs
        engine.prefill(
            BlockPrompt.lay_out(first, torch.ones_like(first), BLOCK, new), rows=torch.tensor([2], device=DEVICE)
        )
        for _ in range(3):
            engine.advance(slots)
        engine.prefill(
            BlockPrompt.lay_out(second, torch.ones_like(second), BLOCK, new), rows=torch.tensor([0], device=DEVICE)
        )
        for _ in range(-(-(new + 1) // BLOCK)):
            engine.advance(slots)
        assert torch.equal(engine.tokens[2], alone[0]) and torch.equal(engine.tokens[0], alone[1])

    _, source = tiny_source("qwen2")
    vanilla = source.to(DEVICE)
    settings = {"max_new_tokens": 10, "do_sample": False, "eos_token_id": None, "pad_token_id": 3}
    try:
        alone = [vanilla.generate(ids, **settings)[0, ids.shape[1] :] for ids in (first[:, :5], second)]
        rules = GenerationRequest.of(vanilla, first, kwargs=settings).rules
        with VanillaEngine.open(vanilla, EngineShape(2, slots, (slots,)), rules) as engine:
            engine.prefill(
                VanillaPrompt(first[:, :5], torch.ones_like(first[:, :5]), 10), rows=torch.tensor([1], device=DEVICE)
            )
            for _ in range(4):
                engine.advance(slots)
            engine.prefill(VanillaPrompt(second, torch.ones_like(second), 10), rows=torch.tensor([0], device=DEVICE))
            for _ in range(9):
                engine.advance(slots)
            assert torch.equal(engine.tokens[1], alone[0]) and torch.equal(engine.tokens[0], alone[1])
    finally:
        source.to("cpu")


def test_inductor_compiled_steps_give_the_same_tokens(converted, tiny_source):
    model = load_block_model(converted("llama")).to(DEVICE)
    ids, mask = on_device(*left_padded(ROWS, seed=7))
    settings = {"max_new_tokens": 23, "do_sample": False, "eos_token_id": [int(ids[0, -1]), 127], "pad_token_id": 0}
    expected = model.generate(ids, attention_mask=mask, engine="fast", **settings)
    assert torch.equal(
        model.generate(ids, attention_mask=mask, engine="fast", compile_steps=True, **settings), expected
    )
    _, source = tiny_source("llama")
    vanilla = source.to(DEVICE)
    try:
        expected = generate_static(vanilla, ids, attention_mask=mask, **settings)
        assert torch.equal(generate_static(vanilla, ids, attention_mask=mask, compile_steps=True, **settings), expected)
    finally:
        source.to("cpu")
