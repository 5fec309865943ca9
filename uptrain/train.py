"""The uptraining loop on accelerate: one process or many (`accelerate launch`), exact resume.

A step is a pure function of (recipe, step, process rank): the batch comes from `TokenData` by global
sample index, so a run resumed from a checkpoint continues exactly where an uninterrupted run would be.
The same loop trains a Block Transformer (converted from `source`, or from scratch) and, for baselines,
the vanilla `source` itself (pretrained or from scratch); `objective.NextTokenObjective` holds the loss.
"""

import contextlib
import functools
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architectures import decoder_layers, is_block_model
from .errors import UserError
from .flops import peak_flops, training_flops_per_token
from .objective import NextTokenObjective, compile_decoders, head_mismatch
from .recipe import Recipe, dump_recipe, public_recipe
from .records import CONVERSION, TRAINING, read_json, write_json
from .scratch import train_padding_rows
from .window_attention import use_window_attention

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"  # one line per step: loss, lr, tokens/s, held-out figures when evaluated
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the teacher's dtype on a GPU
HEAD_CHECK_TOLERANCE = 1e-3  # relative: the fast loss must rebuild the model's own logits in float32
CREATED_BY_CONVERSION = ("embedder_projection", "expansion", "start_context")  # the rest is copied from the source
FSDP_MODEL = "pytorch_model_fsdp"  # accelerate's name for the model state of an FSDP checkpoint


def tune_compiled_kernels() -> None:
    """Inductor times block sizes for each fused GPU kernel (coordinate-descent tuning) instead of taking its
    heuristics' choice: 57% of the recipe's CUDA time is such kernels. On an H100 +4% tokens/s for about five
    more minutes of compilation (docs/training-throughput.md). CPU kernels are not tuned. Read when the
    compiled graphs are built, at the first step, so it is set for the process."""
    import torch._inductor.config

    torch._inductor.config.coordinate_descent_tuning = True


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, or the start context); the parts a conversion
    creates (`created`: True) apart from those it copies from the source, so that their schedules can differ."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            created = is_block_model(model) and name.split(".")[0] in CREATED_BY_CONVERSION
            decay = weight_decay if param.dim() >= 2 else 0.0
            groups.setdefault((created, decay), {"params": [], "weight_decay": decay, "created": created})
            groups[(created, decay)]["params"].append(param)
    return list(groups.values())


def group_lr_factor(created: bool, step: int, recipe: Recipe, total: int) -> float:
    """The learning-rate factor of a parameter group. With `new_parts_first: K`, the layers copied from the
    source stay still for K steps (factor 0) while the new parts learn, then warm up again on the rest of
    the schedule; without it every group follows one schedule."""
    frozen = recipe.new_parts_first
    if created or frozen == 0:
        return lr_factor(step, recipe.warmup_steps, total, recipe.min_lr_ratio)
    if step < frozen:
        return 0.0
    return lr_factor(step - frozen, recipe.warmup_steps, total - frozen, recipe.min_lr_ratio)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose writing finished (partial ones never carry the final name), oldest first."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def checkpoint_layout(path: Path) -> str:
    """How a checkpoint holds model and optimizer: `plain` (one process or DDP: `model.safetensors`,
    `optimizer.bin`), `sharded` (FSDP's default: one torch.distributed.checkpoint folder each, any number
    of processes) or `full` (FSDP with FULL_STATE_DICT: gathered `pytorch_model_fsdp.bin`, `optimizer.bin`)."""
    if (path / f"{FSDP_MODEL}_0").is_dir():
        return "sharded"
    if (path / f"{FSDP_MODEL}.bin").is_file():
        return "full"
    return "plain"


def resume_point(recipe: Recipe) -> Path | None:
    if recipe.resume == "none":
        return None
    if recipe.resume == "auto":
        found = complete_checkpoints(Path(recipe.output_dir))
        return found[-1] if found else None
    path = Path(recipe.resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume checkpoint not found or incomplete: {path}")
    return path


class Trainer:
    """Holds what a run needs; `run()` trains, evaluates, checkpoints and exports."""

    def __init__(self, recipe: Recipe):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        self.recipe = recipe
        self.output_dir = Path(recipe.output_dir)
        trackers = None if recipe.tracker == "none" else recipe.tracker
        # step_scheduler_with_optimizer off: accelerate's default steps the schedule once per process at every
        # optimizer step (made for data loaders it shortens); ours counts optimizer steps, whatever the processes
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[recipe.precision], log_with=trackers, project_dir=str(self.output_dir),
            step_scheduler_with_optimizer=False,
        )
        set_seed(recipe.seed)  # before any random initialisation: every process builds the same weights
        world = self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > world:  # e.g. an FSDP or multi-GPU accelerate config on a machine without GPUs
            raise UserError(f"{launched} processes were launched but accelerate joined none of them into a process group "
                            f"(distributed type {self.accelerator.distributed_type.value}, device "
                            f"{self.accelerator.device.type}); each would train alone. On CPUs, launch the DDP config "
                            "with ACCELERATE_USE_CPU=true; FSDP needs GPUs (docs/multi-gpu.md)")
        # FSDP: weights, gradients and optimizer state are sharded across the processes
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if recipe.global_batch_size % (recipe.micro_batch_size * world):
            raise UserError(
                f"global_batch_size {recipe.global_batch_size} must be a multiple of micro_batch_size x processes "
                f"({recipe.micro_batch_size} x {world})"
            )
        self.accumulation = recipe.global_batch_size // (recipe.micro_batch_size * world)
        self.total_steps = recipe.total_steps()

    # -- setup ------------------------------------------------------------------------------------

    def prepare_model(self) -> Path:
        """The Block Transformer folder to uptrain: `source` itself, or its conversion (made once)."""
        from .architectures import is_block_folder
        from .convert import convert

        if is_block_folder(self.recipe.source):
            return Path(self.recipe.source)
        converted = self.output_dir / "converted"
        if self.accelerator.is_main_process and not (converted / "config.json").is_file():
            convert(self.recipe.source, converted, self.convert_options())
        self.accelerator.wait_for_everyone()
        return converted

    def convert_options(self):
        from .convert import ConvertOptions

        section = self.recipe.convert
        return ConvertOptions(section.block_length, section.block_layers, section.method, section.prefix_length)

    def check_block_length(self, block_length: int) -> None:
        if self.recipe.seq_len % block_length:
            raise UserError(f"seq_len {self.recipe.seq_len} is not a multiple of the block length {block_length}")

    def build_model(self):
        """(float32 model, the folder or source spec that holds its tokenizer and records).

        block: the conversion of `source` (or `source` itself when it is converted already); vanilla:
        `source` as it is. From scratch, either architecture gets random weights of `source`'s shape."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from .architectures import is_block_folder
        from .convert import build_config
        from .modeling_block_transformer import BlockTransformerForCausalLM
        from .sources import load_config, load_model, resolve

        recipe, source = self.recipe, self.recipe.source
        if not recipe.from_scratch:
            if recipe.architecture == "vanilla":
                return load_model(resolve(source), "float32"), source
            model_dir = str(self.prepare_model())
            return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32), model_dir
        if recipe.architecture == "block" and is_block_folder(source):
            model = BlockTransformerForCausalLM(AutoConfig.from_pretrained(source, trust_remote_code=True)).float()
        else:
            config = load_config(resolve(source))
            config.__dict__.pop("quantization_config", None)  # a GGUF source's; the new weights are plain floats
            if recipe.architecture == "vanilla":
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            else:
                model = BlockTransformerForCausalLM(build_config(config, self.convert_options(), torch.float32)).float()
        train_padding_rows(model)  # a zero padding row makes NaN gradients in deep stacks (scratch.py)
        return model, source

    def load(self):
        from .architectures import is_block_folder
        from .data import TokenData, check_tokenizer, load_manifest
        from .sources import load_tokenizer, resolve

        recipe = self.recipe
        manifest = load_manifest(recipe.data)  # fail on bad data and shapes before the slow conversion
        if recipe.architecture == "block" and not is_block_folder(recipe.source):
            self.check_block_length(recipe.convert.block_length)
        model, self.model_dir = self.build_model()
        self.tokenizer = load_tokenizer(resolve(self.model_dir), trust_remote_code=is_block_folder(self.model_dir))
        if self.tokenizer is None:
            raise UserError(f"{self.model_dir} has no tokenizer")
        block_length = model.config.block_length if is_block_model(model) else 1
        self.check_block_length(block_length)
        check_tokenizer(recipe.data, self.tokenizer, model_name=str(self.model_dir))
        self.train_data = TokenData(recipe.data, "train")
        self.val_data = TokenData(recipe.data, "val") if manifest["splits"].get("val", {}).get("tokens") else None
        self.block_offset = block_length if recipe.block_offset and block_length > 1 else 0
        if self.train_data.num_sequences(recipe.seq_len, self.block_offset) < 1:
            raise UserError(f"the training split of {recipe.data} has fewer tokens than one sequence of {recipe.seq_len}")
        if self.val_data is not None and len(self.val_data) < recipe.seq_len:
            self.val_data = None  # too little held-out text for one window: evaluation is skipped

        teacher = self.load_teacher() if recipe.distill.enabled else None
        fast = recipe.fast_loss and self.fast_loss_rebuilds_logits(model, teacher)  # both still float32 on the CPU
        if teacher is not None:  # frozen: the run's half precision on a GPU
            on_gpu = self.accelerator.device.type == "cuda"
            dtype = HALF_PRECISION.get(recipe.precision, torch.float32) if on_gpu else torch.float32
            teacher = teacher.to(device=self.accelerator.device, dtype=dtype)
        self.flops_per_token = training_flops_per_token(model, recipe.seq_len)["total"]
        use_window_attention(model)
        if recipe.compile:
            compile_decoders(model)
            if recipe.compile_tuning:
                tune_compiled_kernels()
            if self.sharded:  # FSDP's hooks cut each stack's graph at every layer, and each layer (its own
                # layer_idx) compiles apart: let all of them compile instead of running past the limit in eager
                config = torch._dynamo.config
                name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
                setattr(config, name, max(getattr(config, name), 2 * len(decoder_layers(model)) + 8))
        objective = NextTokenObjective(model, fast=fast, teacher=teacher, distill_weight=recipe.distill.weight,
                                       temperature=recipe.distill.temperature, compile_loss=recipe.compile,
                                       compile_states=recipe.compile and not self.sharded)
        if self.sharded and recipe.precision in HALF_PRECISION:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # accelerate's FSDP policy for bf16 also reduces gradients in bf16 and casts the forward's outputs
            # (here the loss) to bf16; keep those in float32, as DDP with autocast has them. The weights are
            # gathered in half precision for the compute; the optimizer updates float32 shards.
            self.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=HALF_PRECISION[recipe.precision], reduce_dtype=torch.float32)
        fused = self.accelerator.device.type == "cuda"  # the same update as the per-tensor loop, in one kernel
        optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=tuple(recipe.betas),
                                      fused=fused or None)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [
            functools.partial(group_lr_factor, group["created"], recipe=recipe, total=self.total_steps)
            for group in optimizer.param_groups
        ])
        self.model, self.optimizer, self.schedule = self.accelerator.prepare(objective, optimizer, schedule)
        self.distributed = {"type": self.accelerator.distributed_type.value, "processes": self.accelerator.num_processes}
        if self.sharded:  # the FSDP units: one per decoder layer, and the root holding everything else
            from collections import Counter

            from torch.distributed.fsdp import FSDPModule

            units = Counter(type(m).__name__ for m in self.model.modules() if isinstance(m, FSDPModule))
            self.distributed["fsdp_units"] = dict(sorted(units.items()))

    def fast_loss_rebuilds_logits(self, model, teacher) -> bool:
        """Whether final states through the LM head give the model's (and teacher's) own logits on a sample."""
        ids = self.train_data.batch([0], self.recipe.seq_len, self.recipe.seed)[:, : min(self.recipe.seq_len, 64)]
        for name, lm in (("model", model), ("teacher", teacher)):
            if lm is None:
                continue
            mismatch = head_mismatch(lm, ids)
            if not mismatch <= HEAD_CHECK_TOLERANCE:
                warnings.warn(f"fast_loss is off: the {name}'s final states through its LM head differ from its logits "
                              f"by {mismatch:.1e} (relative), a head block-uptrain does not know; training on full logits")
                return False
        return True

    def load_teacher(self):
        """The frozen teacher, float32 on the CPU. Default: the vanilla source, which is the recipe's `source`
        unless that is a converted folder; then its conversion record names the source, found again only
        when it is a hub id (records name a local source without its path)."""
        from .architectures import is_block_folder
        from .sources import load_model, resolve

        spec = self.recipe.distill.teacher
        if spec is None and not is_block_folder(self.recipe.source):
            spec = self.recipe.source
        if spec is None:
            record = read_json(Path(self.recipe.source) / CONVERSION) or {}
            if "hub_id" not in record.get("source_fingerprint", {}):
                named = f" ({record['source']})" if record.get("source") else ""
                raise UserError(f"distillation needs its teacher: {self.recipe.source} was converted from a local "
                                f"model{named}; set distill.teacher to that model's path")
            spec = record["source"]
        return load_model(resolve(spec), "float32").eval().requires_grad_(False)

    @property
    def language_model(self):
        """The block or vanilla causal LM being trained, outside its training wrappers."""
        return self.accelerator.unwrap_model(self.model).model

    # -- steps ------------------------------------------------------------------------------------

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

    def train_step(self, step: int) -> float:
        """One optimizer step over the global batch; returns the mean cross-entropy across all processes.

        DDP all-reduces the gradients once, after the last micro-batch. FSDP reduce-scatters them after every
        micro-batch: skipping that (`no_sync`) would keep each process's full, unsharded gradients between
        micro-batches, the memory that sharding exists to save. Both sum the same gradients."""
        total = torch.zeros((), device=self.accelerator.device)
        for i, ids in enumerate(self.micro_batches(step)):
            last = i == self.accumulation - 1
            sync = contextlib.nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model)
            with sync, self.accelerator.autocast():
                loss, ce = self.model(ids)  # the objective: the loss to differentiate, the cross-entropy to report
                self.accelerator.backward(loss / self.accumulation)
            total += ce / self.accumulation
        mean = float(self.accelerator.reduce(total, reduction="mean"))
        # the norm before clipping (max_norm inf: measured, not clipped); a finite loss can still have NaN
        # gradients, and one update with them would ruin every weight: `run` stops before any update then
        self.grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip or math.inf))
        if math.isfinite(mean) and math.isfinite(self.grad_norm):
            self.optimizer.step()
            self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out loss and perplexity over the first `eval_windows` windows of the validation split.

        The windows are dealt out to the processes. The forward runs through the objective (outside DDP's
        wrapper; under FSDP the sharded module itself, whose hooks gather the weights), and under FSDP every
        process runs as many forwards as the busiest one, the spare ones uncounted, since each forward's
        gathers are collectives."""
        if self.val_data is None:
            return None
        objective = self.accelerator.unwrap_model(self.model)
        objective.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        windows = list(self.val_data.windows(self.recipe.seq_len, self.recipe.eval_windows))
        mine = [(window, 1.0) for window in windows[rank::world]]
        if self.sharded:
            mine += [(windows[0], 0.0)] * (math.ceil(len(windows) / world) - len(mine))
        sums = torch.zeros(2, device=self.accelerator.device)  # (loss sum, predicted tokens)
        for window, counted in mine:
            ids = window[None].to(self.accelerator.device)
            with self.accelerator.autocast():
                logits = objective(ids, logits=True)
            sums[0] += counted * F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            sums[1] += counted * (ids.shape[1] - 1)
        objective.train()
        sums = self.accelerator.reduce(sums, reduction="sum")
        loss = float(sums[0] / sums[1])
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}

    # -- checkpoints and export ---------------------------------------------------------------------

    def save_checkpoint(self, step: int, facts: dict) -> None:
        """Write checkpoints/step-N atomically: a staging folder, renamed once everything is on disk."""
        folder = self.output_dir / CHECKPOINTS
        final = folder / f"step-{step:08d}"
        staging = folder / f".step-{step:08d}.partial"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (staging / "recipe.yaml").write_text(dump_recipe(self.recipe))
            (staging / STATE_FILE).write_text(json.dumps({"step": step, **facts}, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in complete_checkpoints(self.output_dir)[: -self.recipe.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, schedule and random states from a checkpoint, whatever layout wrote it.

        A checkpoint written by the layout now running (one process or DDP: `model.safetensors` and
        `optimizer.bin`; FSDP: sharded `torch.distributed.checkpoint` folders, on any number of processes)
        goes through `accelerator.load_state`. Across layouts (an FSDP run resumed on one GPU, or the other
        way), model and optimizer go through torch's layout-free state dicts, keyed by parameter name."""
        from accelerate.checkpointing import load_accelerator_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        saved = checkpoint_layout(path)
        if saved == self.state_layout():
            self.accelerator.load_state(str(path))
            return
        optimizer = self.optimizer.optimizer  # the torch optimizer inside accelerate's wrapper
        if saved == "sharded":
            import torch.distributed.checkpoint as dcp

            model_state, optimizer_state = get_state_dict(self.model, optimizer)  # this layout's tensors, to fill
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is what is meant here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"model": model_state}, checkpoint_id=str(path / f"{FSDP_MODEL}_0"))
                dcp.load({"optimizer": optimizer_state}, checkpoint_id=str(path / "optimizer_0"))
            options = None
        else:
            model_state, optimizer_state = self.full_states(path, saved)
            options = StateDictOptions(full_state_dict=True)
        set_state_dict(self.model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=options)
        load_accelerator_state(str(path), [], [], [self.schedule], [], self.accelerator.process_index)

    def state_layout(self) -> str:
        """How this run's `save_state` writes model and optimizer (see `checkpoint_layout`)."""
        if not self.sharded:
            return "plain"
        sharded = self.accelerator.state.fsdp_plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        return "sharded" if sharded else "full"

    def full_states(self, path: Path, layout: str) -> tuple[dict, dict]:
        """(model, optimizer) state dicts of full tensors keyed by parameter name, from a `plain` or `full`
        checkpoint. A plain optimizer state numbers the parameters in the optimizer's order; safetensors keeps
        one name of tied parameters, and the other names are filled in."""
        from safetensors.torch import load_file

        objective = self.accelerator.unwrap_model(self.model)
        names = {}  # id(parameter) -> all its names (a tied head has two)
        for name, param in objective.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        if layout == "plain":
            model_state = load_file(path / "model.safetensors")
        else:
            model_state = torch.load(path / f"{FSDP_MODEL}.bin", map_location="cpu", weights_only=True)
        for aliases in names.values():
            present = [name for name in aliases if name in model_state]
            for name in aliases:
                if present and name not in model_state:
                    model_state[name] = model_state[present[0]]
        optimizer_state = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
        if any(isinstance(key, int) for key in optimizer_state["state"]) or layout == "plain":
            order = [names[id(p)][0] for group in self.optimizer.optimizer.param_groups for p in group["params"]]
            optimizer_state = {
                "state": {order[index]: value for index, value in optimizer_state["state"].items()},
                "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                                 for group in optimizer_state["param_groups"]],
            }
        return model_state, optimizer_state

    def export(self, facts: dict) -> Path:
        """<output_dir>/final: a Block Transformer in exactly the `convert` format, a vanilla model as
        `save_pretrained` writes it; the training facts and the recipe beside either.

        The weights come from `accelerator.get_state_dict`, called on every process: under FSDP it gathers
        the full (unsharded) tensors onto the main process, which writes the folder."""
        from .card import model_card
        from .export import saved_tensors, staged_folder, write_model_folder

        out = self.output_dir / "final"
        state = self.accelerator.get_state_dict(self.model)  # keys of the objective: "model." + the LM's own
        if self.accelerator.is_main_process:
            model = self.language_model
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # restored on load; gathered copies
            state = {name.removeprefix("model."): tensor for name, tensor in state.items()}  # no longer share storage
            state = {name: tensor for name, tensor in state.items() if name not in tied}
            with staged_folder(out, overwrite=True) as folder:
                if is_block_model(model):
                    records = {TRAINING: facts}
                    conversion = read_json(Path(self.model_dir) / CONVERSION)
                    if conversion is not None and not self.recipe.from_scratch:
                        records[CONVERSION] = conversion
                    names, tensors = saved_tensors(model, state)
                    write_model_folder(
                        folder, model.config, tensors, total=len(names), tokenizer=self.tokenizer,
                        generation_config=getattr(model, "generation_config", None),
                        card=model_card(model.config.to_dict(), records.get(CONVERSION), training=facts,
                                        recipe=public_recipe(self.recipe)),
                        records=records,
                    )
                else:
                    model.save_pretrained(folder, state_dict=state)
                    self.tokenizer.save_pretrained(folder)
                    write_json(folder / TRAINING, facts)
                (folder / "recipe.yaml").write_text(dump_recipe(self.recipe, public=True))
        self.accelerator.wait_for_everyone()
        return out

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> dict:
        recipe = self.recipe
        self.load()
        start = 0
        checkpoint = resume_point(recipe)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            start = json.loads((checkpoint / STATE_FILE).read_text())["step"]
        self.accelerator.init_trackers("uptrain", config={k: str(v) for k, v in recipe.to_dict().items()})
        tokens_per_step = recipe.global_batch_size * recipe.seq_len
        facts = {"architecture": recipe.architecture, "from_scratch": recipe.from_scratch, "steps": start,
                 "tokens": start * tokens_per_step, "train_loss": None, "eval": None, "distributed": self.distributed}
        peak = peak_flops(self.accelerator.device)
        bar = tqdm(range(start, self.total_steps), initial=start, total=self.total_steps, desc="training",
                   disable=not self.accelerator.is_main_process)
        self.model.train()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        for step in bar:
            step_started = time.perf_counter()
            loss = self.train_step(step)
            step_seconds = time.perf_counter() - step_started
            if not (math.isfinite(loss) and math.isfinite(self.grad_norm)):
                last = complete_checkpoints(self.output_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
                what = (f"training loss became {loss}" if not math.isfinite(loss) else
                        f"the gradient norm became {self.grad_norm} (loss {loss:.4f})")
                raise UserError(f"{what} at step {step + 1}; stopped before updating the weights ({kept})")
            done = step + 1
            facts.update(steps=done, tokens=done * tokens_per_step, train_loss=loss)
            elapsed = time.perf_counter() - clock
            rate = (done - start) * tokens_per_step / max(elapsed, 1e-9)
            step_rate = tokens_per_step / max(step_seconds, 1e-9)
            logs = {"train/loss": loss, "train/grad_norm": self.grad_norm, "train/lr": self.schedule.get_last_lr()[0],
                    "train/tokens_per_s": rate,
                    "train/step_seconds": step_seconds, "train/step_tokens_per_s": step_rate}
            shown = dict(loss=f"{loss:.3f}", lr=f"{logs['train/lr']:.2e}", tok_s=f"{step_rate:,.0f}")
            if peak:  # model FLOPs utilisation of this step, per GPU (flops.py has the formula)
                logs["train/mfu"] = step_rate * self.flops_per_token / (peak * self.accelerator.num_processes)
                shown["mfu"] = f"{logs['train/mfu']:.1%}"
            if self.accelerator.device.type == "cuda":  # the largest of the processes' peaks so far
                held = torch.tensor([float(torch.cuda.max_memory_allocated(self.accelerator.device))],
                                    device=self.accelerator.device)
                logs["train/peak_memory_gib"] = float(self.accelerator.gather(held).max()) / 2**30
            bar.set_postfix(**shown)
            if done % recipe.eval_every == 0 or done == self.total_steps:
                facts["eval"] = self.evaluate()
                if facts["eval"]:
                    logs.update({f"eval/{k}": v for k, v in facts["eval"].items()})
                    bar.write(f"step {done}: val loss {facts['eval']['val_loss']:.4f}, "
                              f"perplexity {facts['eval']['val_perplexity']:.2f}")
            if done % recipe.log_every == 0 or "eval/val_loss" in logs:
                self.accelerator.log(logs, step=done)
            if self.accelerator.is_main_process:
                with open(self.output_dir / LOG_FILE, "a") as log:
                    log.write(json.dumps({"step": done, **logs}) + "\n")
            if done % recipe.save_every == 0 or done == self.total_steps:
                self.save_checkpoint(done, facts)
        facts["final_model"] = str(self.export(facts))  # before end_training, which ends the process group
        self.accelerator.end_training()
        return facts


def train(recipe: Recipe) -> dict:
    return Trainer(recipe).run()
