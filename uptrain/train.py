"""The uptraining loop on accelerate: one process or many (`accelerate launch`), exact resume.

A step is a pure function of (recipe, step, process rank): the batch comes from `TokenData` by global
sample index, so a run resumed from a checkpoint continues exactly where an uninterrupted run would be.
The same loop trains a Block Transformer (converted from `source`, or from scratch) and, for baselines,
the vanilla `source` itself (pretrained or from scratch). Its parts: `models` builds the model and the
teacher, `objective` holds the loss, `alignment` the alignment stage's, `compiling` makes every compile
decision, `checkpoints` saves and resumes; this module sets them up and runs the loop.

With `align.steps`, the run's first steps are the alignment stage: the block decoder and the new parts learn
the source's states (`alignment.py`) with their own warm-up and cosine, every other weight unchanged; the
end-to-end stage follows with the recipe's schedule over the remaining steps. One optimizer serves both:
AdamW skips parameters without gradients, and the stage's frozen ones have none when it steps.
"""

import contextlib
import functools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .alignment import PrefixAlignment, check_recipe, model_layout, sink_slots, source_stack, trained_parameters
from .architectures import is_block_folder, is_block_model, output_head
from .checkpoints import complete_checkpoints, load_checkpoint, resume_point, save_checkpoint
from .compiling import apply_compile
from .errors import UserError
from .flops import peak_flops, training_flops_per_token
from .models import HALF_PRECISION, load_teacher, teacher_on, teacher_spec, training_model
from .objective import NextTokenObjective, fast_loss_fits
from .recipe import Recipe, dump_recipe, public_recipe
from .records import CONVERSION, TRAINING, read_json, write_json

LOG_FILE = "train_log.jsonl"  # a line per reported step: loss, lr, tokens/s, held-out figures when evaluated
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
HEAD_SAMPLE_TOKENS = 64  # the fast loss is checked against the model's logits on this many tokens


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def staged_lr_factor(step: int, warmup: int, total: int, min_ratio: float, align_steps: int = 0,
                     align_scale: float = 1.0) -> float:
    """The factor of `lr` at `step`: over the first `align_steps` steps the alignment stage's own schedule, to a
    peak of `align_scale` x lr (align.lr) after 10% of them (at least 1), cosine to `min_ratio` of that peak at
    their end; then `lr_factor` over the remaining `total - align_steps` steps."""
    if step < align_steps:
        return align_scale * lr_factor(step, max(1, align_steps // 10), align_steps, min_ratio)
    return lr_factor(step - align_steps, warmup, total - align_steps, min_ratio)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, or the start context)."""
    groups = {}
    for param in model.parameters():
        if param.requires_grad:
            decay = weight_decay if param.dim() >= 2 else 0.0
            groups.setdefault(decay, {"params": [], "weight_decay": decay})["params"].append(param)
    return list(groups.values())


def make_accelerator(recipe: Recipe):
    """accelerate's Accelerator for the recipe; processes it did not join into one group are refused."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # the alignment stage leaves the token decoder without gradients, which DDP must be told to expect
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if recipe.align.steps else []
    # step_scheduler_with_optimizer off: accelerate's default steps the schedule once per process at every
    # optimizer step (made for data loaders it shortens); ours counts optimizer steps, whatever the processes
    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[recipe.precision], project_dir=recipe.output_dir,
        log_with=None if recipe.tracker == "none" else recipe.tracker, step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:  # e.g. an FSDP or multi-GPU accelerate config on a machine without GPUs
        raise UserError(f"{launched} processes were launched but accelerate joined none of them into a process group "
                        f"(distributed type {accelerator.distributed_type.value}, device "
                        f"{accelerator.device.type}); each would train alone. On CPUs, launch the DDP config "
                        "with ACCELERATE_USE_CPU=true; FSDP needs GPUs (docs/guides/multi-gpu.md)")
    return accelerator


def accumulation_steps(recipe: Recipe, processes: int) -> int:
    """Micro-batches each process runs per optimizer step."""
    if recipe.global_batch_size % (recipe.micro_batch_size * processes):
        raise UserError(f"global_batch_size {recipe.global_batch_size} must be a multiple of micro_batch_size x "
                        f"processes ({recipe.micro_batch_size} x {processes})")
    return recipe.global_batch_size // (recipe.micro_batch_size * processes)


def check_block_length(recipe: Recipe, block_length: int) -> None:
    if recipe.seq_len % block_length:
        raise UserError(f"seq_len {recipe.seq_len} is not a multiple of the block length {block_length}")


def token_data(recipe: Recipe, manifest: dict, tokenizer, block_length: int, model_name: str):
    """(training stream, held-out stream or None, block offset) of the recipe's data, checked against the
    model's tokenizer and the sequence length."""
    from .data import TokenData, check_tokenizer

    check_tokenizer(recipe.data, tokenizer, model_name=model_name)
    train_data = TokenData(recipe.data, "train")
    val_data = TokenData(recipe.data, "val") if manifest["splits"].get("val", {}).get("tokens") else None
    block_offset = block_length if recipe.block_offset and block_length > 1 else 0
    if train_data.num_sequences(recipe.seq_len, block_offset) < 1:
        raise UserError(f"the training split of {recipe.data} has fewer tokens than one sequence of {recipe.seq_len}")
    if val_data is not None and len(val_data) < recipe.seq_len:
        val_data = None  # too little held-out text for one window: evaluation is skipped
    return train_data, val_data, block_offset


def fsdp_half_precision(accelerator, dtype: torch.dtype) -> None:
    """FSDP gathers the weights in half precision for the compute; the optimizer updates float32 shards.

    accelerate's FSDP policy for bf16 also reduces gradients in bf16 and casts the forward's outputs (here
    the loss) to bf16; this one keeps those in float32, as DDP with autocast has them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype,
                                                                                reduce_dtype=torch.float32)


def make_optimizer(model, recipe: Recipe, total_steps: int, fused: bool):
    """(AdamW, its schedule): the alignment stage's and then warm-up and cosine (`staged_lr_factor`), one schedule
    for every group. `fused` (on CUDA): the same update as the per-tensor loop, in one kernel."""
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=tuple(recipe.betas),
                                  fused=fused or None)
    align = recipe.align
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        staged_lr_factor, warmup=recipe.warmup_steps, total=total_steps, min_ratio=recipe.min_lr_ratio,
        align_steps=align.steps, align_scale=align.lr / recipe.lr if align.steps else 1.0))
    return optimizer, schedule


def non_finite(step: int, loss: float, grad_norm: float, output_dir: Path, name: str = "training loss") -> UserError:
    """The error of a step whose loss (`name`) or gradient norm is not finite, naming the last good checkpoint."""
    last = complete_checkpoints(output_dir)
    kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
    what = (f"{name} became {loss}" if not math.isfinite(loss) else
            f"the gradient norm became {grad_norm} (loss {loss:.4f})")
    return UserError(f"{what} at step {step + 1}; stopped before updating the weights ({kept})")


class Trainer:
    """`setup()` builds what a run needs; `fit()` trains, evaluates, checkpoints and exports."""

    def __init__(self, recipe: Recipe):
        from accelerate.utils import DistributedType, set_seed

        self.recipe = recipe
        self.output_dir = Path(recipe.output_dir)
        self.accelerator = make_accelerator(recipe)
        set_seed(recipe.seed)  # before any random initialisation: every process builds the same weights
        # FSDP: weights, gradients and optimizer state are sharded across the processes
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        self.accumulation = accumulation_steps(recipe, self.accelerator.num_processes)
        self.total_steps = recipe.total_steps()
        self.tokens_per_step = recipe.global_batch_size * recipe.seq_len

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, loss, compilation, optimizer and schedule, prepared by accelerate."""
        from .data import load_manifest
        from .sources import load_tokenizer, resolve

        recipe = self.recipe
        manifest = load_manifest(recipe.data)  # fail on bad data and shapes before the slow conversion
        if recipe.architecture == "block" and not is_block_folder(recipe.source):
            check_block_length(recipe, recipe.convert.block_length)
        if recipe.align.steps:
            check_recipe(recipe)
        model, self.model_dir = training_model(recipe, self.accelerator)
        self.tokenizer = load_tokenizer(resolve(self.model_dir), trust_remote_code=is_block_folder(self.model_dir))
        if self.tokenizer is None:
            raise UserError(f"{self.model_dir} has no tokenizer")
        block_length = model.config.block_length if is_block_model(model) else 1
        check_block_length(recipe, block_length)
        self.train_data, self.val_data, self.block_offset = token_data(recipe, manifest, self.tokenizer, block_length,
                                                                       str(self.model_dir))
        objective = self.build_objective(model, load_teacher(recipe) if recipe.distill.enabled or recipe.align.steps
                                         else None)
        self.flops_per_token = training_flops_per_token(model, recipe.seq_len)["total"]
        apply_compile(objective, compile=recipe.compile, tuning=recipe.compile_tuning, sharded=self.sharded)
        if self.sharded and recipe.precision in HALF_PRECISION:
            fsdp_half_precision(self.accelerator, HALF_PRECISION[recipe.precision])
        fused = self.accelerator.device.type == "cuda"
        optimizer, schedule = make_optimizer(model, recipe, self.total_steps, fused)
        self.model, self.optimizer, self.schedule = self.accelerator.prepare(objective, optimizer, schedule)
        self.frozen_in_alignment = []  # of the prepared parameters (FSDP replaces them with shards)
        if recipe.align.steps:
            prepared = self.accelerator.unwrap_model(self.model)
            trained = {id(param) for param in trained_parameters(prepared.model)}
            self.frozen_in_alignment = [param for param in prepared.parameters() if id(param) not in trained]
        self.distributed = {"type": self.accelerator.distributed_type.value,
                            "processes": self.accelerator.num_processes}
        if self.sharded:
            self.distributed["fsdp_units"] = fsdp_units(self.model)

    def build_objective(self, model, source) -> NextTokenObjective:
        """The loss: the fast path where final states through the LM head give the model's (and teacher's)
        own logits, checked while both are float32 on the CPU; the teacher then goes to the run's device.
        `source`: the vanilla source (`models.teacher_spec`), the teacher with distillation and the origin of the
        alignment stage's states, or None."""
        recipe = self.recipe
        alignment = None
        if recipe.align.steps:
            layers = len(model.config.source_layers["block_decoder"])
            stack = source_stack(source, layers, model.config.block_decoder.hidden_size)
            slots = sink_slots(model_layout(recipe)[1])
            alignment = PrefixAlignment(teacher_on(stack, self.accelerator.device, recipe.precision), slots,
                                        recipe.align.loss)
        teacher = source if recipe.distill.enabled else None
        widths = [output_head(m)[0].shape[-1] for m in (model, teacher) if m is not None]  # of the final states
        if recipe.distill.hidden_weight and widths[0] != widths[-1]:
            raise UserError(f"distill.hidden_weight needs a teacher whose final states are as wide as the model's "
                            f"({widths[0]}); {teacher_spec(recipe)} has {widths[-1]}")
        sample = self.train_data.batch([0], recipe.seq_len, recipe.seed)[:, : min(recipe.seq_len, HEAD_SAMPLE_TOKENS)]
        fast = recipe.fast_loss and fast_loss_fits({"model": model, "teacher": teacher}, sample)
        if teacher is not None:
            teacher = teacher_on(teacher, self.accelerator.device, recipe.precision)
        return NextTokenObjective(model, fast=fast, teacher=teacher, distill_weight=recipe.distill.weight,
                                  temperature=recipe.distill.temperature, hidden_weight=recipe.distill.hidden_weight,
                                  alignment=alignment)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from the resume point to the last step, then export; the run's facts."""
        recipe, accelerator = self.recipe, self.accelerator
        self.setup()
        checkpoint = resume_point(recipe)
        start = 0 if checkpoint is None else load_checkpoint(accelerator, checkpoint, self.model, self.optimizer,
                                                             self.schedule)
        accelerator.init_trackers("uptrain", config={k: str(v) for k, v in recipe.to_dict().items()})
        facts = {"architecture": recipe.architecture, "from_scratch": recipe.from_scratch, "steps": start,
                 "tokens": start * self.tokens_per_step, "train_loss": None, "eval": None,
                 "distributed": self.distributed}
        run_log = RunLog(accelerator, self.output_dir, self.tokens_per_step, self.flops_per_token)
        bar = tqdm(range(start, self.total_steps), initial=start, total=self.total_steps, desc="training",
                   disable=not accelerator.is_main_process)
        self.model.train()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        for step in bar:
            done = step + 1
            evaluating = done % recipe.eval_every == 0 or done == self.total_steps
            saving = done % recipe.save_every == 0 or done == self.total_steps
            reporting = done % recipe.log_every == 0 or evaluating or saving
            began = time.perf_counter()
            metrics = self.train_step(step, report=reporting)
            seconds = time.perf_counter() - began
            if not reporting:
                continue  # nothing comes back to the host on this step
            rate = (done - start) * self.tokens_per_step / (time.perf_counter() - clock)
            logs = run_log.figures(metrics, self.schedule.get_last_lr()[0], seconds, rate)
            facts.update(steps=done, tokens=done * self.tokens_per_step, train_loss=logs["train/loss"])
            if evaluating and self.val_data is not None:
                facts["eval"] = validate(accelerator, self.model, self.val_data, recipe.seq_len, recipe.eval_windows,
                                         self.sharded)
                logs.update({f"eval/{k}": v for k, v in facts["eval"].items()})
                bar.write(f"step {done}: val loss {facts['eval']['val_loss']:.4f}, "
                          f"perplexity {facts['eval']['val_perplexity']:.2f}")
            run_log.write(done, logs, bar)
            if saving:
                save_checkpoint(accelerator, recipe, done, facts)
        facts["final_model"] = str(self.export(facts))  # before end_training, which ends the process group
        accelerator.end_training()
        return facts

    def micro_batches(self, step: int):
        from .data import sample_indices

        recipe = self.recipe
        indices = sample_indices(
            step, recipe.global_batch_size, self.accelerator.process_index, self.accelerator.num_processes
        )
        for start in range(0, len(indices), recipe.micro_batch_size):
            chunk = indices[start : start + recipe.micro_batch_size]
            batch = self.train_data.batch(chunk, recipe.seq_len, recipe.seed, self.block_offset)
            yield batch.to(self.accelerator.device)  # (micro, seq_len)

    def train_step(self, step: int, report: bool = True) -> dict[str, torch.Tensor]:
        """One optimizer step over the global batch: {"loss": the mean cross-entropy across all processes,
        "grad_norm": the gradient norm before clipping}, scalar tensors on the device; in the alignment stage
        also "align_loss", the mean alignment loss, and "loss" only when `report` (the cross-entropy is then
        computed without gradients, only for the log).

        DDP all-reduces the gradients once, after the last micro-batch. FSDP reduce-scatters them after every
        micro-batch: skipping that (`no_sync`) would keep each process's full, unsharded gradients between
        micro-batches, the memory that sharding exists to save. Both sum the same gradients. One value comes
        back to the host: whether loss and norm are finite. A finite loss can still have NaN gradients, and
        one update with them would ruin every weight: the run stops before the update."""
        aligning = step < self.recipe.align.steps
        device = self.accelerator.device
        total, align_total = torch.zeros((), device=device), torch.zeros((), device=device)
        for i, ids in enumerate(self.micro_batches(step)):
            last = i == self.accumulation - 1
            sync = contextlib.nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model)
            with sync, self.accelerator.autocast():
                # the objective: the loss to differentiate, the cross-entropy to report (None: not computed)
                loss, ce = self.model(ids, align=True, report=report) if aligning else self.model(ids)
                self.accelerator.backward(loss / self.accumulation)
            if ce is not None:
                total += ce / self.accumulation
            if aligning:
                align_total += loss.detach() / self.accumulation
        if aligning:
            for param in self.frozen_in_alignment:  # the embedding table's gradient, and any a wrapper filled in
                param.grad = None
        metrics = {}
        if not aligning or report:
            metrics["loss"] = self.accelerator.reduce(total, reduction="mean")
        if aligning:
            metrics["align_loss"] = self.accelerator.reduce(align_total, reduction="mean")
        # max_norm inf: measured, not clipped
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip or math.inf)
        checked = metrics.get("align_loss", metrics.get("loss"))
        if not torch.isfinite(torch.stack([checked, grad_norm])).all():
            name = "alignment loss" if aligning else "training loss"
            raise non_finite(step, float(checked), float(grad_norm), self.output_dir, name)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "grad_norm": grad_norm}

    def export(self, facts: dict) -> Path:
        """<output_dir>/final (see `export_model`)."""
        state = self.accelerator.get_state_dict(self.model)  # gathers FSDP's shards: every process calls it
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model).model  # the causal LM, outside the wrappers
            export_model(self.output_dir / "final", model, state, self.tokenizer, self.recipe, self.model_dir, facts)
        self.accelerator.wait_for_everyone()
        return self.output_dir / "final"


class RunLog:
    """The figures of a reported step, read back to the host, and where they go: the progress bar, the
    trackers and a line of `train_log.jsonl`."""

    def __init__(self, accelerator, output_dir: Path, tokens_per_step: int, flops_per_token: float):
        self.accelerator = accelerator
        self.path = output_dir / LOG_FILE
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token

    def figures(self, metrics: dict, lr: float, seconds: float, rate: float) -> dict:
        """Loss, gradient norm, learning rate, tokens/s (the run's and this step's), MFU on a GPU whose peak is
        known (not in the alignment stage, which runs part of the model), and on CUDA the largest of the
        processes' peak memories (a collective: every process calls it); the alignment loss in that stage."""
        device = self.accelerator.device
        step_rate = self.tokens_per_step / max(seconds, 1e-9)
        logs = {"train/loss": float(metrics["loss"]), "train/grad_norm": float(metrics["grad_norm"]),
                "train/lr": lr, "train/tokens_per_s": rate, "train/step_seconds": seconds,
                "train/step_tokens_per_s": step_rate}
        if "align_loss" in metrics:
            logs["train/align_loss"] = float(metrics["align_loss"])
        peak = peak_flops(device) if "align_loss" not in metrics else None
        if peak:  # model FLOPs utilisation of this step, per GPU (flops.py has the formula)
            logs["train/mfu"] = step_rate * self.flops_per_token / (peak * self.accelerator.num_processes)
        if device.type == "cuda":
            held = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device)
            logs["train/peak_memory_gib"] = float(self.accelerator.gather(held).max()) / 2**30
        return logs

    def write(self, step: int, logs: dict, bar) -> None:
        shown = {"loss": f"{logs['train/loss']:.3f}", "lr": f"{logs['train/lr']:.2e}",
                 "tok_s": f"{logs['train/step_tokens_per_s']:,.0f}"}
        if "train/align_loss" in logs:
            shown["align"] = f"{logs['train/align_loss']:.4f}"
        if "train/mfu" in logs:
            shown["mfu"] = f"{logs['train/mfu']:.1%}"
        bar.set_postfix(**shown)
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as log:
                log.write(json.dumps({"step": step, **logs}) + "\n")


@torch.no_grad()
def validate(accelerator, model, val_data, seq_len: int, max_windows: int, sharded: bool) -> dict:
    """Held-out loss and perplexity over the first `max_windows` windows of seq_len tokens of `val_data`.

    The windows are dealt out to the processes. The forward runs through the objective (outside DDP's
    wrapper; under FSDP the sharded module itself, whose hooks gather the weights), and under FSDP every
    process runs as many forwards as the busiest one, the spare ones uncounted, since each forward's
    gathers are collectives."""
    objective = accelerator.unwrap_model(model)
    objective.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    windows = list(val_data.windows(seq_len, max_windows))
    mine = [(window, 1.0) for window in windows[rank::world]]
    if sharded:
        mine += [(windows[0], 0.0)] * (math.ceil(len(windows) / world) - len(mine))
    sums = torch.zeros(2, device=accelerator.device)  # (loss sum, predicted tokens)
    for window, counted in mine:
        ids = window[None].to(accelerator.device)
        with accelerator.autocast():
            logits = objective(ids, logits=True)
        sums[0] += counted * F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        sums[1] += counted * (ids.shape[1] - 1)
    objective.train()
    sums = accelerator.reduce(sums, reduction="sum")
    loss = float(sums[0] / sums[1])
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}


def fsdp_units(model) -> dict[str, int]:
    """The FSDP units by class: one per decoder layer, and the root holding everything else."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    units = Counter(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
    return dict(sorted(units.items()))


def export_model(out: Path, model, state: dict, tokenizer, recipe: Recipe, model_dir: str, facts: dict) -> None:
    """A Block Transformer in exactly the `convert` format, a vanilla model as `save_pretrained` writes it;
    the training facts and the recipe beside either. `state`: the objective's full state dict (keys
    "model." + the LM's own), from `accelerator.get_state_dict`."""
    from .card import model_card
    from .export import saved_tensors, staged_folder, write_model_folder

    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # restored on load; gathered copies
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()}  # no longer share storage
    state = {name: tensor for name, tensor in state.items() if name not in tied}
    with staged_folder(out, overwrite=True) as folder:
        if is_block_model(model):
            records = {TRAINING: facts}
            conversion = read_json(Path(model_dir) / CONVERSION)
            if conversion is not None and not recipe.from_scratch:
                records[CONVERSION] = conversion
            names, tensors = saved_tensors(model, state)
            write_model_folder(
                folder, model.config, tensors, total=len(names), tokenizer=tokenizer,
                generation_config=getattr(model, "generation_config", None),
                card=model_card(model.config.to_dict(), records.get(CONVERSION), training=facts,
                                recipe=public_recipe(recipe)),
                records=records,
            )
        else:
            model.save_pretrained(folder, state_dict=state)
            tokenizer.save_pretrained(folder)
            write_json(folder / TRAINING, facts)
        (folder / "recipe.yaml").write_text(dump_recipe(recipe, public=True))


def train(recipe: Recipe) -> dict:
    return Trainer(recipe).fit()
