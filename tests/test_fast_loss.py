"""The fast loss (LM head and loss in row chunks) against the plain path over full logits, and FLOPs per token.

float32 on the CPU: the two paths sum in another order, nothing else, so losses and every gradient agree to
float32 rounding (stated tolerances: rel 1e-5 on the loss, 1e-4 of each gradient's largest entry).
"""

import pytest
import torch
from conftest import load_block_model
from families import FAMILIES
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from uptrain import architectures
from uptrain.chunked_loss import ChunkGradient, chunked_head_loss, cross_entropy_chunks
from uptrain.compiling import apply_compile
from uptrain.flops import training_flops_per_token
from uptrain.objective import NextTokenObjective, head_mismatch
from uptrain.window_attention import use_window_attention


def gradients(model, objective, ids):
    """(loss, cross-entropy, gradients) of one backward pass; eval mode, so dropout (GPT-2's) draws nothing."""
    model.eval().zero_grad(set_to_none=True)
    loss, ce = objective(ids)
    loss.backward()
    return loss.detach(), ce, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model, ids, teacher=None, **settings):
    plain = gradients(model, NextTokenObjective(model, fast=False, teacher=teacher, **settings), ids)
    fast = gradients(model, NextTokenObjective(model, fast=True, chunk_rows=7, teacher=teacher, **settings), ids)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-5, atol=0)
    assert fast[2].keys() == plain[2].keys() and len(plain[2]) == len(list(model.parameters()))
    for name, expected in plain[2].items():
        scale = float(expected.abs().max())
        assert scale > 0, f"{name} got no gradient"
        torch.testing.assert_close(fast[2][name], expected, rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_loss_equals_plain_loss_and_gradients(family, tiny_source, converted):
    _, source = tiny_source(family)
    ids = torch.randint(4, 128, (3, 32), generator=torch.Generator().manual_seed(1))
    block = load_block_model(converted(family))
    assert_same_training_signal(source, ids)
    assert_same_training_signal(block, ids)


def test_distillation_fast_equals_plain(tiny_source, converted):
    _, teacher = tiny_source("llama")
    student = load_block_model(converted("llama"))
    ids = torch.randint(4, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    assert_same_training_signal(student, ids, teacher=teacher.eval(), distill_weight=0.3, temperature=2.0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "granite", "gemma3_text"])
def test_hidden_state_distillation_fast_equals_plain(family, tiny_source, converted):
    """CE, KL and the final states' relative MSE together (granite: its head divides the logits; gpt2: dropout
    off in eval mode, learned positions), fast against plain."""
    _, teacher = tiny_source(family)
    student = load_block_model(converted(family))
    ids = torch.randint(4, 128, (2, 32), generator=torch.Generator().manual_seed(6))
    settings = dict(distill_weight=0.3, temperature=2.0, hidden_weight=0.7)
    assert_same_training_signal(student, ids, teacher=teacher.eval(), **settings)


def test_hidden_state_distillation_with_soft_capped_logits():
    """A vanilla student and teacher with Gemma's final soft cap: the term is added to what the head paths give."""
    config = FAMILIES["gemma3_text"]()
    config.final_logit_softcapping = 0.5
    torch.manual_seed(0)
    student, teacher = (AutoModelForCausalLM.from_config(config, dtype=torch.float32) for _ in range(2))
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    assert_same_training_signal(student, ids, teacher=teacher.eval(), distill_weight=0.5, hidden_weight=2.0)


@pytest.mark.parametrize("fast", [True, False])
def test_the_hidden_term_against_float64(fast, tiny_source, converted):
    """hidden_weight x mean over predicted positions of ||s - t||^2 / ||t||^2, with the teacher's final states
    from its own `output_hidden_states` (after the final norm) and the student's from `next_token_states`."""
    _, teacher = tiny_source("qwen2")
    student = load_block_model(converted("qwen2"))
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        without, ce = NextTokenObjective(student, fast=fast, teacher=teacher.eval())(ids)
        with_term, ce_again = NextTokenObjective(student, fast=fast, teacher=teacher, hidden_weight=0.25)(ids)
        t = teacher(ids, output_hidden_states=True).hidden_states[-1][:, :-1].double()
        s = student.next_token_states(ids).double()
    expected = 0.25 * ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean()
    assert float(expected) > 0.05
    torch.testing.assert_close((with_term - without).double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(ce, ce_again)  # the reported cross-entropy is the cross-entropy alone


@pytest.mark.slow
def test_compiled_fast_path_equals_plain(tiny_source, converted):
    """The GPU recipe's path (`apply_compile` with `compile`): decoder stacks compiled whole, the states of
    student and teacher each compiled as one graph, the chunk loss and its gradient compiled, against the eager
    plain path; block and vanilla, with distillation."""
    folder, _ = tiny_source("llama")
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # a copy: compiled in place
    student = load_block_model(converted("llama"))
    use_window_attention(student)
    ids = torch.randint(4, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    for model in (student, teacher):
        settings = dict(teacher=teacher, distill_weight=0.3, temperature=2.0)
        plain = gradients(model, NextTokenObjective(model, fast=False, **settings), ids)  # before any compilation
        objective = NextTokenObjective(model, fast=True, chunk_rows=13, **settings)
        apply_compile(objective, compile=True, tuning=False, sharded=False)
        compiled = gradients(model, objective, ids)
        torch.testing.assert_close(compiled[0], plain[0], rtol=1e-5, atol=0)
        assert compiled[2].keys() == plain[2].keys()
        for name, expected in plain[2].items():
            torch.testing.assert_close(
                compiled[2][name], expected, rtol=0, atol=1e-4 * float(expected.abs().max()), msg=name
            )


def test_soft_capped_logits(tmp_path):
    """Gemma-style final soft cap (tanh), strong enough to matter: the transform is applied and differentiated."""
    config = FAMILIES["gemma3_text"]()
    config.final_logit_softcapping = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(4, 128, (2, 16))
    assert head_mismatch(model, ids) < 1e-6
    assert_same_training_signal(model, ids)


def test_an_unknown_logit_transform_is_detected(tiny_source, monkeypatch):
    _, granite = tiny_source("granite")  # divides its logits by logits_scaling = 2
    ids = torch.randint(4, 128, (1, 16))
    assert head_mismatch(granite, ids) < 1e-6
    monkeypatch.delitem(architectures.LOGIT_TRANSFORMS, "granite")
    assert head_mismatch(granite, ids) > 0.3


def test_chunked_cross_entropy_against_float64():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(29, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    labels = torch.randint(50, (29,), generator=generator)
    labels[[0, 5, 17]] = -100
    total, reported = chunked_head_loss(
        hidden, weight, bias, ChunkGradient(cross_entropy_chunks()), (labels,), chunk_rows=6
    )
    (total * 0.5).backward()

    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    expected = torch.nn.functional.cross_entropy(h @ w.T + b, labels, ignore_index=-100, reduction="sum")
    (expected * 0.5).backward()
    torch.testing.assert_close(total.double(), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(reported, total.detach())
    for ours, reference in ((hidden, h), (weight, w), (bias, b)):
        torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_flops_per_token_against_a_flop_counter(family, tiny_source, converted):
    """The formula against torch's FLOP counter over a real forward and backward pass of the fast path.

    The counter sees what ran: the head over T-1 positions, attention with the causal half included (as
    the formula's convention counts it), and the r prefix positions of every window."""
    seq_len, batch = 64, 2
    _, source = tiny_source(family)
    ids = torch.randint(4, 128, (batch, seq_len), generator=torch.Generator().manual_seed(4))
    for model in (source, load_block_model(converted(family))):
        model.set_attn_implementation("eager")  # attention as matmuls the counter sees (it skips CPU SDPA)
        objective = NextTokenObjective(model, fast=True)
        with FlopCounterMode(display=False) as counter:
            loss, _ = objective(ids)
            loss.backward()
        measured = counter.get_total_flops() / (batch * seq_len)
        predicted = training_flops_per_token(model, seq_len)["total"]
        model.set_attn_implementation("sdpa")
        assert measured == pytest.approx(predicted, rel=0.01), type(model).__name__


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_window_attention_gives_the_models_logits(family, converted):
    """Training's token-decoder attention against the model's own (SDPA), logits and gradients."""
    model = load_block_model(converted(family))
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    expected = gradients(model, NextTokenObjective(model, fast=False), ids)
    use_window_attention(model)
    assert model.token_decoder.config._attn_implementation == "block_window"
    assert model.block_decoder.config._attn_implementation != "block_window"
    got = gradients(model, NextTokenObjective(model, fast=False), ids)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=0, atol=1e-4 * float(grad.abs().max()), msg=name)
