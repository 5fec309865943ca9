"""Writing a model folder (contract 1) atomically: everything goes to a staging folder beside the target,
which is renamed into place only when complete, so a failure never leaves a half-written output."""

import json
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import UserError
from .records import write_json

PACKAGE_DIR = Path(__file__).parent
MODEL_FILES = ("configuration_block_transformer.py", "modeling_block_transformer.py", "generation_block_transformer.py")
AUTO_MAP = {
    "AutoConfig": "configuration_block_transformer.BlockTransformerConfig",
    "AutoModelForCausalLM": "modeling_block_transformer.BlockTransformerForCausalLM",
}
SHARD_BYTES = 500 * 2**20


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty target unless told to overwrite it; called before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty (use --overwrite to replace it)")


@contextmanager
def staged_folder(out: Path, overwrite: bool):
    """Yield a fresh staging folder; on success it replaces `out`, on any error it is removed."""
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def untied_names(model) -> list[str]:
    """State-dict names to save: tied copies (an LM head tied to its embeddings) are restored on load."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return [name for name in model.state_dict() if name not in tied]


def saved_tensors(model, state: dict | None = None) -> tuple[list[str], Iterable[tuple[str, torch.Tensor]]]:
    """(names, iterator of (name, tensor)) of an in-memory model, for `write_model_folder`. `state`, when
    given, holds the model's tensors under its names (a state dict gathered from processes that each hold a
    shard); tied copies are left out either way."""
    state = model.state_dict() if state is None else state
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    names = [name for name in state if name not in tied]
    return names, ((name, state[name]) for name in names)


def write_model_folder(
    folder: Path,
    config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    total: int,
    tokenizer=None,
    generation_config=None,
    card: str | None = None,
    records: dict[str, dict] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write config, code, weights (sharded safetensors), tokenizer, generation config, card and records."""
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["BlockTransformerForCausalLM"]
    config.save_pretrained(folder)
    for name in MODEL_FILES:
        shutil.copyfile(PACKAGE_DIR / name, folder / name)
    write_safetensors(folder, tensors, total, shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    for name, record in (records or {}).items():
        write_json(folder / name, record)
    if card is not None:
        (folder / "README.md").write_text(card)


def write_safetensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], total: int, shard_bytes: int) -> None:
    """Write tensors as they come, in shards of about `shard_bytes`, with an index when there are several."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    paths: list[Path] = []
    size = total_size = 0
    written_storage: set[int] = set()

    def flush():
        path = folder / f"shard-{len(paths):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        paths.append(path)
        shards[-1] = {name: None for name in shards[-1]}  # keep the names, drop the tensors

    for name, tensor in tqdm(tensors, total=total, desc="writing weights", unit="tensor"):
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in written_storage:  # the same source tensor under two names (duplicate init)
            tensor = tensor.clone()
        written_storage.add(tensor.untyped_storage().data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total_size += nbytes
    flush()

    if len(paths) == 1:
        paths[0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for number, (path, shard) in enumerate(zip(paths, shards), start=1):
        final = f"model-{number:05d}-of-{len(paths):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update({name: final for name in shard})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
