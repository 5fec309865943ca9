"""A saved folder works with lm-evaluation-harness's Hugging Face wrapper (HFLM, trust_remote_code=True) on
local loglikelihood requests, and its scores are the model's own teacher-forced log-probabilities."""

import math

import pytest
import torch
from conftest import load_block_model
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

PAIRS = [("The cat sat on", " the mat"), ("Hello", " world"), ("abc", "def"), ("A block transformer", " is fast.")]


def harness(folder, trust_remote_code=True) -> HFLM:
    return HFLM(pretrained=str(folder), trust_remote_code=trust_remote_code, backend="causal", device="cpu",
                batch_size=2, dtype="float32")


def loglikelihoods(lm: HFLM, pairs) -> list[tuple[float, bool]]:
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    return lm.loglikelihood(requests)


def teacher_forced(model, lm: HFLM, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is the greedy choice, from one float64 forward pass."""
    context_ids = lm.tok_encode(context)
    continuation_ids = lm.tok_encode(context + continuation)[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model.double()(ids).logits[0].log_softmax(-1)
    scored = logprobs[len(context_ids) - 1 : -1]  # the rows that predict the continuation
    targets = torch.tensor(continuation_ids)
    total = scored.gather(1, targets[:, None]).sum().item()
    return total, bool(torch.equal(scored.argmax(-1), targets))


def test_harness_scores_a_block_transformer_like_a_teacher_forced_pass(converted):
    folder = converted("llama")  # L_B = 4: not the identity, so this checks the block model's forward, not the source's
    lm = harness(folder)
    model = load_block_model(folder)
    greedy = model.generate(torch.tensor([lm.tok_encode("Hello")]), max_new_tokens=6, do_sample=False)[0, -6:]
    greedy_text = "".join(lm.tokenizer.convert_ids_to_tokens(greedy.tolist()))  # the test tokenizer: one char a token
    pairs = PAIRS + [("Hello", greedy_text)]

    results = loglikelihoods(lm, pairs)
    for (context, continuation), (got, got_greedy) in zip(pairs, results):
        expected, expected_greedy = teacher_forced(model, lm, context, continuation)
        assert math.isclose(got, expected, rel_tol=1e-4), (context, continuation)
        assert got_greedy == expected_greedy
    assert results[-1][1], "the model's own greedy continuation must be its greedy choice"


def test_harness_identity_conversion_scores_like_its_source(tiny_source, run_cli, tmp_path):
    source, _ = tiny_source("qwen2")
    identity = tmp_path / "identity"
    assert run_cli("convert", source, identity, "--block-length", 1, "--block-layers", 4).exit_code == 0
    ours = loglikelihoods(harness(identity), PAIRS)
    theirs = loglikelihoods(harness(source, trust_remote_code=False), PAIRS)
    for (got, got_greedy), (expected, expected_greedy) in zip(ours, theirs):
        assert got == pytest.approx(expected, rel=1e-5) and got_greedy == expected_greedy
