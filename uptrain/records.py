"""The JSON records written beside a model: how it was converted, trained and evaluated.

Every writer goes through `write_json`, which replaces the file atomically (a reader never sees half a
record); the model card and `uptrain push` read them back with `read_records`.
"""

import json
import os
from pathlib import Path

import yaml

CONVERSION = "conversion.json"  # `uptrain convert`: source, options, layer map, versions
TRAINING = "training.json"  # `uptrain train`: steps, tokens, losses, distributed setup
EVALUATION = "eval_results.json"  # `uptrain eval` and the quickstart: perplexity and zero-shot results
RECIPE = "recipe.yaml"  # the recipe of an uptrained model, local paths cut to their names
RECORD_FILES = {"conversion": CONVERSION, "training": TRAINING, "evaluation": EVALUATION}


def write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` as indented JSON, atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def read_records(folder: Path) -> dict:
    """{"conversion": ..., "training": ..., "evaluation": ..., "recipe": ...}: the records present in `folder`."""
    folder = Path(folder)
    records = {key: read_json(folder / name) for key, name in RECORD_FILES.items()}
    recipe = folder / RECIPE
    if recipe.is_file():
        records["recipe"] = yaml.safe_load(recipe.read_text())
    return {key: value for key, value in records.items() if value is not None}


def merge_evaluation(existing: dict, new: dict) -> dict:
    """eval_results.json after a run: the run's perplexity results (top-level model/baseline/settings) replace
    the old ones when it has any, its task results replace those of the same tasks; everything else stays."""
    perplexity = new if "model" in new else existing
    merged = {key: value for key, value in perplexity.items() if key != "zero_shot"}
    tasks = {**existing.get("zero_shot", {}), **new.get("zero_shot", {})}
    if tasks:
        merged["zero_shot"] = tasks
    return merged


def update_evaluation(folder: Path, new: dict) -> None:
    """Merge `new` results into the folder's eval_results.json (see `merge_evaluation`)."""
    path = Path(folder) / EVALUATION
    write_json(path, merge_evaluation(read_json(path) or {}, new))
