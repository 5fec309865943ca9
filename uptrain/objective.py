"""What the trainer differentiates: the next-token loss of a causal LM, block or vanilla, and the alignment
stage's loss.

`NextTokenObjective` wraps the model so that the whole loss runs inside one `forward` (what DDP and FSDP
wrap and hook). Two paths compute the same function:
- fast: the final hidden states go through the LM head chunk by chunk (`chunked_loss`), so the (B, T, V)
  logits and their float32 copies never exist;
- plain: `model(ids).logits`, then the loss over full logits (the reference the fast path is tested
  against, and the fallback for heads the fast path does not know).
With a teacher, distillation adds its KL over the logits and, with `hidden_weight`, the relative MSE of the
final states (what each head consumes, after the final norm) at the same positions. With a `PrefixAlignment`,
`forward(ids, align=True)` gives the alignment stage's loss instead (`alignment.py`).
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import PrefixAlignment, relative_mse
from .architectures import decoder_layers, is_block_model, output_head
from .chunked_loss import (
    DEFAULT_CHUNK_ROWS,
    ChunkGradient,
    chunked_cross_entropy,
    chunked_head_loss,
    cross_entropy_chunks,
    distillation_chunks,
)

HEAD_CHECK_TOLERANCE = 1e-3  # relative: the fast loss must rebuild the model's own logits in float32


def next_token_states(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T-1, D) final states; the head turns states[:, t] into the score of token t+1."""
    if is_block_model(model):
        return model.next_token_states(ids)
    return model.base_model(input_ids=ids).last_hidden_state[:, :-1]


def distillation_loss(student, teacher, labels, weight: float, temperature: float):
    """(1-w) * CE(student) + w * T^2 * KL(teacher || student) at temperature T, over predicted positions.

    Full (B, T, V) logits of both; the plain path's reference for `chunked_loss.distillation_chunks`."""
    vocab = student.shape[-1]
    ce = F.cross_entropy(student[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1))
    log_student = F.log_softmax(student[:, :-1].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
    kl = F.kl_div(log_student.reshape(-1, vocab), log_teacher.reshape(-1, vocab), log_target=True,
                  reduction="batchmean")
    return (1 - weight) * ce + weight * temperature**2 * kl, ce


class NextTokenObjective(nn.Module):
    """forward(ids (B, T)) -> (loss to differentiate, mean cross-entropy), with an optional frozen teacher and an
    optional alignment stage.

    The teacher (a causal LM without gradients) and the alignment's source are held outside the module's
    parameters, so optimisers, checkpoints and DDP see the student alone.
    """

    def __init__(self, model: nn.Module, fast: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 teacher: nn.Module | None = None, distill_weight: float = 0.5, temperature: float = 1.0,
                 hidden_weight: float = 0.0, alignment: PrefixAlignment | None = None):
        super().__init__()
        self.model = model
        self.fast = fast
        self.chunk_rows = chunk_rows
        self._teacher = [teacher] if teacher is not None else []  # a list: not registered as a submodule
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.hidden_weight = hidden_weight if teacher is not None else 0.0
        self.alignment = alignment
        _, _, transform = output_head(model)
        if teacher is None:
            chunk_loss = cross_entropy_chunks(transform)
        else:
            t_weight, t_bias, t_transform = output_head(teacher)
            chunk_loss = distillation_chunks(t_weight, t_bias, distill_weight, temperature, transform, t_transform)
        self.chunk_gradient = ChunkGradient(chunk_loss)

    def student_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B*(T-1), D) final states of the model, one row per predicted token."""
        return next_token_states(self.model, ids).flatten(0, 1)

    def teacher_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B*(T-1), D) final states of the teacher, without gradients."""
        with torch.no_grad():
            return next_token_states(self.teacher, ids).flatten(0, 1)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    @property
    def _no_split_modules(self) -> list[str]:
        """The decoder-layer classes of the model (LlamaDecoderLayer, GPTNeoXLayer, ...): the units FSDP's
        transformer auto-wrap policy shards one by one when the accelerate config names none itself."""
        return sorted({type(layer).__name__ for layer in decoder_layers(self.model)})

    def forward(self, ids: torch.Tensor, logits: bool = False, align: bool = False, report: bool = True):
        """(loss to differentiate, mean cross-entropy); with `logits=True` the model's (B, T, V) logits instead,
        for evaluation: under FSDP every use of the weights must go through this module's forward, whose
        hooks gather the sharded parameters (the LM head included, which the fast loss reads directly).

        `align=True`: (alignment loss, mean cross-entropy without gradients), the cross-entropy only when
        `report` (else None): it costs a pass through the token decoder that the stage does not train."""
        if logits:
            return self.model(ids).logits
        if align:
            return self.alignment(self.model, ids), (self.reported_cross_entropy(ids) if report else None)
        return self.fast_loss(ids) if self.fast else self.plain_loss(ids)

    def plain_loss(self, ids):
        logits = self.model(ids).logits  # (B, T, V)
        if self.teacher is None:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            return ce, ce.detach()
        with torch.no_grad():
            teacher_logits = self.teacher(ids).logits
        loss, ce = distillation_loss(logits, teacher_logits, ids, self.distill_weight, self.temperature)
        if self.hidden_weight:  # the model's logits do not expose its final states: a second pass gives them
            states = next_token_states(self.model, ids).flatten(0, 1)  # (B*(T-1), D)
            loss = loss + self.hidden_weight * relative_mse(states.float(), self.teacher_rows(ids).float())
        return loss, ce.detach()

    def fast_loss(self, ids):
        states = self.student_rows(ids)  # (B*(T-1), D)
        labels = ids[:, 1:].flatten()  # (B*(T-1),)
        row_inputs = (labels,)
        if self.teacher is not None:
            row_inputs += (self.teacher_rows(ids),)  # (B*(T-1), D)
        weight, bias, _ = output_head(self.model)
        total, reported = chunked_head_loss(states, weight, bias, self.chunk_gradient, row_inputs, self.chunk_rows)
        count = labels.numel()
        loss = total / count
        if self.hidden_weight:
            loss = loss + self.hidden_weight * relative_mse(states.float(), row_inputs[1].float())
        return loss, reported / count

    def reported_cross_entropy(self, ids) -> torch.Tensor:
        """The mean cross-entropy, without gradients and without drawing from the random generators (dropout's
        draws here would make a run depend on how often it reports)."""
        rng_devices = [ids.device] if ids.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            if not self.fast:
                logits = self.model(ids).logits  # (B, T, V)
                return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            weight, bias, transform = output_head(self.model)
            return chunked_cross_entropy(self.student_rows(ids), weight, bias, ids[:, 1:].flatten(), transform,
                                         self.chunk_rows)


@torch.no_grad()
def head_mismatch(model: nn.Module, ids: torch.Tensor) -> float:
    """Largest |rebuilt logit - model logit| over a short sample (B, T), relative to the logits' scale.

    The fast path rebuilds logits from final states, the head and `architectures.LOGIT_TRANSFORMS`; a
    family whose head does something else shows here before a single step is trained."""
    logits = model(ids).logits[:, :-1].float()  # (B, T-1, V)
    weight, bias, transform = output_head(model)
    states = next_token_states(model, ids).to(weight.dtype)
    rebuilt = transform(F.linear(states, weight, bias).float())
    return float((rebuilt - logits).abs().max() / logits.abs().max().clamp(min=1e-6))


def fast_loss_fits(models: dict[str, nn.Module | None], ids: torch.Tensor) -> bool:
    """Whether final states through the LM head give each model's own logits on a sample (B, T) ids, within
    HEAD_CHECK_TOLERANCE; warns, naming the model, where they do not."""
    for name, model in models.items():
        if model is None:
            continue
        mismatch = head_mismatch(model, ids)
        if not mismatch <= HEAD_CHECK_TOLERANCE:
            warnings.warn(f"fast_loss is off: the {name}'s final states through its LM head differ from its logits "
                          f"by {mismatch:.1e} (relative), a head block-uptrain does not know; training on full logits")
            return False
    return True
