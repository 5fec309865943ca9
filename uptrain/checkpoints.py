"""Checkpoints of a training run: atomic save, the resume point, and loading across layouts.

`output_dir/checkpoints/step-NNNNNNNN` holds accelerate's `save_state` (model, optimizer, schedule, every
process's random states), the recipe and `trainer_state.json` (the step and the run's facts). It is written
into a staging folder and renamed once complete, so a folder with the final name is always whole.

Model and optimizer come in one of three layouts (`checkpoint_layout`):
- plain: one process or DDP: `model.safetensors`, `optimizer.bin`;
- sharded: FSDP's default: one torch.distributed.checkpoint folder each, readable by any number of processes;
- full: FSDP with FULL_STATE_DICT: the gathered `pytorch_model_fsdp.bin` and `optimizer.bin`.
A run resumes from any of them: in its own layout through `accelerator.load_state`, across layouts (an
FSDP run resumed on one GPU, or the other way) through torch's layout-free state dicts, keyed by name.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch

from .errors import UserError
from .recipe import Recipe, dump_recipe

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FSDP_MODEL = "pytorch_model_fsdp"  # accelerate's name for the model state of an FSDP checkpoint


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose writing finished (partial ones never carry the final name), oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def resume_point(recipe: Recipe) -> Path | None:
    """The checkpoint `resume` names: the newest complete one (`auto`), none, or a given folder."""
    if recipe.resume == "none":
        return None
    if recipe.resume == "auto":
        found = complete_checkpoints(Path(recipe.output_dir))
        return found[-1] if found else None
    path = Path(recipe.resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume checkpoint not found or incomplete: {path}")
    return path


def checkpoint_layout(path: Path) -> str:
    """How a checkpoint holds model and optimizer: `plain`, `sharded` or `full` (see the module docstring)."""
    if (path / f"{FSDP_MODEL}_0").is_dir():
        return "sharded"
    if (path / f"{FSDP_MODEL}.bin").is_file():
        return "full"
    return "plain"


def run_layout(accelerator) -> str:
    """The layout this run's `save_state` writes."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return "plain"
    sharded = accelerator.state.fsdp_plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    return "sharded" if sharded else "full"


def aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all its names, the one `named_parameters()` gives first (a tied head has two)."""
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def save_tied_once(models: list, weights: list[dict], output_dir: str) -> None:
    """accelerate `save_state` pre-hook: every tensor under one name, the first of its aliases.

    A tied head is the input embedding under a second name. safetensors stores a tensor once and
    `safetensors.torch.load_model` (what `load_state` reads it with) fills in the other names, so the
    aliases are left out here rather than by accelerate's clean-up, which warns at every checkpoint."""
    for model, state in zip(models, weights):
        for names in aliases(model).values():
            for name in names[1:]:
                state.pop(name, None)


def save_checkpoint(accelerator, recipe: Recipe, step: int, facts: dict) -> Path:
    """Write checkpoints/step-N atomically; keep the newest `keep_checkpoints`. Every process calls it."""
    folder = Path(recipe.output_dir) / CHECKPOINTS
    final = folder / f"step-{step:08d}"
    staging = folder / f".step-{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(save_tied_once)
    try:
        accelerator.save_state(str(staging))
    finally:
        hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "recipe.yaml").write_text(dump_recipe(recipe))
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **facts}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in complete_checkpoints(recipe.output_dir)[: -recipe.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model, optimizer, schedule) -> int:
    """Restore model, optimizer, schedule and random states from a checkpoint of any layout; its step.

    `model`, `optimizer` and `schedule` are the prepared ones (accelerate's wrappers)."""
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    step = json.loads((path / STATE_FILE).read_text())["step"]
    saved = checkpoint_layout(path)
    if saved == run_layout(accelerator):
        accelerator.load_state(str(path))
        return step
    inner = optimizer.optimizer  # the torch optimizer inside accelerate's wrapper
    if saved == "sharded":
        model_state, optimizer_state = sharded_states(path, model, inner)
        options = None
    else:
        model_state, optimizer_state = full_states(path, saved, accelerator.unwrap_model(model), inner)
        options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, inner, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)
    load_accelerator_state(str(path), [], [], [schedule], [], accelerator.process_index)
    return step


def sharded_states(path: Path, model, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of this run's layout, filled from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # this layout's tensors, to fill
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_state}, checkpoint_id=str(path / f"{FSDP_MODEL}_0"))
        dcp.load({"optimizer": optimizer_state}, checkpoint_id=str(path / "optimizer_0"))
    return model_state, optimizer_state


def full_states(path: Path, layout: str, objective: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of full tensors keyed by parameter name, from a `plain` or `full`
    checkpoint. A plain optimizer state numbers the parameters in the optimizer's order; safetensors keeps
    one name of tied parameters, and the other names are filled in."""
    from safetensors.torch import load_file

    names = aliases(objective)
    if layout == "plain":
        model_state = load_file(path / "model.safetensors")
    else:
        model_state = torch.load(path / f"{FSDP_MODEL}.bin", map_location="cpu", weights_only=True)
    for group in names.values():
        present = [name for name in group if name in model_state]
        for name in group:
            if present and name not in model_state:
                model_state[name] = model_state[present[0]]
    optimizer_state = torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
    if any(isinstance(key, int) for key in optimizer_state["state"]) or layout == "plain":
        order = [names[id(p)][0] for group in optimizer.param_groups for p in group["params"]]
        optimizer_state = {
            "state": {order[index]: value for index, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                             for group in optimizer_state["param_groups"]],
        }
    return model_state, optimizer_state
