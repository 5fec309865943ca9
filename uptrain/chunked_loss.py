"""Losses over the LM head computed in row chunks, so that (tokens, vocab) logits never exist at once.

With a 49,152-word vocabulary, 16 x 2048 tokens of logits are 3.2 GB in bf16 and 6.4 GB more as the float32
copy a plain cross-entropy makes, plus their gradients: more memory than the whole model's activations.
Here each chunk of rows gets its logits, its loss and the loss's gradient with respect to those logits in
the forward pass; the chunk's logits are then dropped and only the gradients of the hidden states
(rows, D) and of the head (V, D) are kept for the backward pass (the idea of Liger-Kernel's fused linear
cross-entropy and of cut-cross-entropy, in plain PyTorch). The matmul work is the same as the plain path's:
one head product forward, two backward.

The loss of a chunk is any function of its float32 logits (cross-entropy, distillation KL), and the
architecture's logit transform (a scale, a soft cap) is applied inside it, so `torch.func` differentiates
through it; see `architectures.logit_transform`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

# rows (tokens) per chunk: 8,192 x 49,152 float32 logits are 1.6 GB, small beside an 80 GB card, and the
# head products stay large enough to run at full speed.
DEFAULT_CHUNK_ROWS = 8192

# chunk_loss(logits (C, V) float32, *row_inputs[start:end]) -> (loss sum to differentiate, a sum to report)
ChunkLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would run the head's matmul in (the tensors' own dtype without autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class ChunkGradient:
    """(gradient w.r.t. the logits, (loss, reported)) of a chunk loss, for logits and gradient in the head's
    compute dtype while the loss runs in float32. Built once per run, so that `function` can be compiled
    once (`compiling.apply_compile`: one fused kernel for the upcast, softmax, loss, gradient and its
    downcast, instead of several passes over the chunk's logits)."""

    def __init__(self, chunk_loss: ChunkLoss):
        gradient = torch.func.grad_and_value(chunk_loss, has_aux=True)

        def in_logits_dtype(logits, *row_inputs):  # logits (C, V) -> gradient (C, V), same dtype
            grad, aux = gradient(logits.float(), *row_inputs)
            return grad.to(logits.dtype), aux

        self.function = in_logits_dtype

    def __call__(self, logits, *row_inputs):
        return self.function(logits, *row_inputs)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, gradient: ChunkGradient, chunk_rows: int, *row_inputs):
        # hidden (R, D), weight (V, D), bias (V,) or None, row_inputs (R, ...) each
        dtype = _compute_dtype(hidden.device, weight.dtype)
        h, w = hidden.detach().to(dtype), weight.detach().to(dtype)
        b = None if bias is None else bias.detach().to(dtype)
        grad_hidden = torch.empty_like(h)  # (R, D)
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # (V, D)
        grad_bias = None if b is None else torch.zeros(b.shape, dtype=torch.float32, device=b.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        report = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_rows):
                end = min(start + chunk_rows, h.shape[0])
                h_chunk = h[start:end]  # (C, D)
                logits = h_chunk @ w.T if b is None else torch.addmm(b, h_chunk, w.T)  # (C, V)
                grad_logits, (chunk, reported) = gradient(logits, *(t[start:end] for t in row_inputs))  # (C, V)
                loss += chunk
                report += reported
                torch.mm(grad_logits, w, out=grad_hidden[start:end])
                grad_weight += grad_logits.T @ h_chunk
                if grad_bias is not None:
                    grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.inputs = len(row_inputs)
        ctx.mark_non_differentiable(report)
        return loss, report

    @staticmethod
    def backward(ctx, grad_loss, _grad_report):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_hidden * grad_loss).to(hidden_dtype)
        grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        grad_bias = None if grad_bias is None else (grad_bias * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, *([None] * ctx.inputs)


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gradient: ChunkGradient,
                      row_inputs: tuple[torch.Tensor, ...], chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """(loss sum, reported sum) of a chunk loss over the head's logits `hidden @ weight.T + bias`, chunk by chunk.

    hidden (R, D) final states, weight (V, D), bias (V,) or None; `row_inputs` (R, ...) tensors (labels, a
    teacher's states) are cut into the same chunks. Gradients reach hidden, weight and bias.
    """
    return _ChunkedHeadLoss.apply(hidden, weight, bias, gradient, chunk_rows, *row_inputs)


def cross_entropy_chunks(transform: Callable = lambda z: z) -> ChunkLoss:
    """chunk loss (logits, labels) -> summed cross-entropy, -100 ignored; reports the same sum."""

    def loss(logits, labels):
        total = F.cross_entropy(transform(logits), labels, ignore_index=-100, reduction="sum")
        return total, total

    return loss


def distillation_chunks(teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None, weight: float,
                        temperature: float, transform: Callable = lambda z: z,
                        teacher_transform: Callable = lambda z: z) -> ChunkLoss:
    """chunk loss (logits, labels, teacher states) -> summed (1-w) * CE + w * T^2 * KL(teacher || student) at
    temperature T; reports the summed CE.

    The teacher's logits are made chunk by chunk too, from its final states and its (frozen) head, so
    neither model's full logits exist at once."""

    def loss(logits, labels, teacher_states):
        student = transform(logits)  # (C, V)
        t_logits = F.linear(teacher_states.to(teacher_weight.dtype), teacher_weight, teacher_bias)
        log_teacher = F.log_softmax(teacher_transform(t_logits.float()) / temperature, dim=-1)
        ce = F.cross_entropy(student, labels, ignore_index=-100, reduction="sum")
        log_student = F.log_softmax(student / temperature, dim=-1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
        return (1 - weight) * ce + weight * temperature**2 * kl, ce

    return loss


@torch.no_grad()
def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, transform: Callable = lambda z: z,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy (-100 ignored) of `transform(hidden @ weight.T + bias)` against labels (R,), chunk by
    chunk and without gradients: for a figure to report, not to train on."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = F.linear(hidden[start : start + chunk_rows], weight, bias).float()  # (C, V)
        total += F.cross_entropy(transform(logits), labels[start : start + chunk_rows], ignore_index=-100,
                                 reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)
