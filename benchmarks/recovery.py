"""Recovery of converted models under several uptraining methods, on the same tokens and held-out windows.

    python benchmarks/recovery.py PLAN.yaml OUT [--only NAME ...] [--seeds 0,1]

PLAN (YAML) names a source, prepared data (`uptrain data prepare`), a base recipe and a list of runs; each
run is a conversion (options of `uptrain convert`) and recipe overrides, trained once per seed with
`uptrain train`'s loop. Every run is scored on the first `eval_windows` windows of the data's held-out
split (the trainer's own evaluation, every `eval_every` steps) and, before training, its fresh conversion
on the same windows; optionally on an out-of-domain text (`ood`, scored by `uptrain eval`'s scorer) after
training. Conversions are made once per set of options and reused.

Writes OUT/results.json (per run and seed: held-out loss against steps and against training seconds, the
fresh conversion's loss, the final losses) and OUT/recovery.png (loss against steps and against seconds,
mean over seeds). A run whose result is in OUT already is not trained again (delete its folder to redo it).

PLAN keys:
    source: default                 # any `uptrain convert` SOURCE
    data: /path/to/tokens           # an `uptrain data prepare` folder with a val split
    recipe: tiny-cpu                # a shipped recipe name or a YAML path: the shared settings
    overrides: [max_steps=60, eval_every=15, eval_windows=64]
    seeds: [0, 1]
    ood: /path/to/text.jsonl        # optional, scored after training
    ood_windows: 64
    runs:
      - name: ce                    # today's conversion, cross-entropy
      - name: distill
        overrides: [distill.enabled=true]
      - name: input2-sink
        convert: {token_input_layers: 2, sink: source}
      - name: vanilla               # the source fine-tuned on the same tokens: the ceiling
        architecture: vanilla
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

CONVERSIONS = "converted"  # OUT/converted/<key>: one folder per set of conversion options
RUNS = "runs"  # OUT/runs/<name>-s<seed>: each run's output_dir (train_log.jsonl, final/)


def conversion_key(options: dict) -> str:
    """A folder name for a set of conversion options: 'default' or sorted key-value pairs."""
    if not options:
        return "default"
    return "-".join(f"{key}={value}" for key, value in sorted(options.items())).replace("_", "-")


def heldout_windows(data: str, seq_len: int, count: int) -> list[torch.Tensor]:
    """The windows the trainer evaluates on: the first `count` windows of seq_len tokens of the val split."""
    from uptrain.data import TokenData

    return list(TokenData(data, "val").windows(seq_len, count))


@torch.no_grad()
def heldout_loss(model, windows: list[torch.Tensor]) -> float:
    """Mean next-token loss over the windows, float32, one window at a time: the trainer's `validate`."""
    total, count = 0.0, 0
    for window in windows:
        ids = window[None]
        logits = model(ids).logits.float()
        total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def read_curve(output_dir: Path) -> list[dict]:
    """From a run's train_log.jsonl, one point per evaluated step: {step, loss (held-out), seconds}, seconds
    being the training time up to that step (the logged steps' own times; evaluation not counted)."""
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    points, elapsed = [], 0.0
    for row in rows:
        elapsed += row.get("train/step_seconds", 0.0)
        if "eval/val_loss" in row:
            points.append({"step": row["step"], "loss": row["eval/val_loss"], "seconds": elapsed})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", help="run only these runs (by name)")
    parser.add_argument("--seeds", help="comma-separated seeds, replacing the plan's")
    args = parser.parse_args()
    plan = yaml.safe_load(args.plan.read_text())
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else plan.get("seeds", [0])
    runs = [run for run in plan["runs"] if not args.only or run["name"] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}, "fresh": {}}
    results["plan"] = plan
    for run in runs:
        for seed in seeds:
            key = f"{run['name']}-s{seed}"
            if key in results["runs"]:
                continue
            results["runs"][key] = train_run(plan, run, seed, args.out, results)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "recovery.png")
    print(table(results))


def train_run(plan: dict, run: dict, seed: int, out: Path, results: dict) -> dict:
    """Convert (once per options), score the fresh conversion (once), train, read the curve, score ood."""
    from uptrain.convert import ConvertOptions, convert
    from uptrain.default_model import default_model_path
    from uptrain.inference import load_for_inference
    from uptrain.recipe import load_recipe
    from uptrain.shipped_recipes import recipe_path
    from uptrain.train import train

    source = str(default_model_path()) if plan["source"] == "default" else plan["source"]
    overrides = [f"data={plan['data']}", f"seed={seed}", "resume=none", "tracker=none", *plan.get("overrides", []),
                 *run.get("overrides", [])]
    output_dir = out / RUNS / f"{run['name']}-s{seed}"
    architecture = run.get("architecture", "block")
    record = {"name": run["name"], "seed": seed, "architecture": architecture, "convert": run.get("convert", {}),
              "overrides": run.get("overrides", [])}
    if architecture == "vanilla":
        overrides += [f"source={source}", "architecture=vanilla"]
        model_spec = source
    else:
        options = run.get("convert", {})
        key = conversion_key(options)
        folder = out / CONVERSIONS / key
        base = load_recipe(recipe_path(plan["recipe"]), overrides)
        if not (folder / "config.json").is_file():
            section = base.convert
            defaults = {"block_length": section.block_length, "block_layers": section.block_layers,
                        "method": section.method, "prefix_length": section.prefix_length}
            convert(source, folder, ConvertOptions(**{**defaults, **options}), overwrite=True)
        overrides += [f"source={folder}", f"distill.teacher={source}"]
        model_spec = str(folder)
        record["conversion"] = key
    recipe = load_recipe(recipe_path(plan["recipe"]), overrides + [f"output_dir={output_dir}"])
    fresh_key = record.get("conversion", "vanilla")
    if fresh_key not in results["fresh"]:
        model = load_for_inference(model_spec, dtype="float32")[0]
        windows = heldout_windows(plan["data"], recipe.seq_len, recipe.eval_windows)
        results["fresh"][fresh_key] = heldout_loss(model, windows)
    started = time.perf_counter()
    facts = train(recipe)
    record.update(wall_seconds=time.perf_counter() - started, tokens=facts["tokens"], steps=facts["steps"],
                  curve=read_curve(output_dir))
    record["fresh_loss"] = results["fresh"][fresh_key]
    if plan.get("ood"):
        record["ood"] = ood_loss(Path(facts["final_model"]), plan["ood"], recipe.seq_len, plan.get("ood_windows", 64))
    return record


def ood_loss(model_dir: Path, text: str, seq_len: int, windows: int) -> float:
    from uptrain.evaluate import read_documents, score, text_windows
    from uptrain.inference import load_for_inference

    model, tokenizer = load_for_inference(str(model_dir), dtype="float32")
    return score(model, tokenizer, text_windows(tokenizer, read_documents([text]), seq_len, windows))["loss"]


def summary(results: dict) -> dict[str, dict]:
    """Per run name: the fresh conversion's loss, and at every evaluated step the mean held-out loss over the
    seeds, their spread (max - min) and the mean training seconds."""
    by_name: dict[str, list[dict]] = {}
    for record in results["runs"].values():
        by_name.setdefault(record["name"], []).append(record)
    rows = {}
    for name, records in by_name.items():
        points: dict[int, list[dict]] = {}
        for record in records:
            for point in record["curve"]:
                points.setdefault(point["step"], []).append(point)
        rows[name] = {
            "fresh": records[0]["fresh_loss"],
            "seeds": len(records),
            "steps": sorted(points),
            "mean": {step: statistics.mean(p["loss"] for p in group) for step, group in points.items()},
            "spread": {step: max(p["loss"] for p in group) - min(p["loss"] for p in group)
                       for step, group in points.items()},
            "seconds": {step: statistics.mean(p["seconds"] for p in group) for step, group in points.items()},
        }
    return rows


def table(results: dict) -> str:
    rows = summary(results)
    steps = sorted({step for row in rows.values() for step in row["mean"]})
    lines = ["| run | fresh | " + " | ".join(f"step {step}" for step in steps) + " |",
             "|---|---:|" + "---:|" * len(steps)]
    for name, row in rows.items():
        cells = [f"{row['mean'][step]:.3f}" if step in row["mean"] else "" for step in steps]
        lines.append(f"| {name} | {row['fresh']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 5))
    for name, row in summary(results).items():
        steps = row["steps"]
        losses = [row["mean"][step] for step in steps]
        seconds = [row["seconds"][step] for step in steps]
        by_step.plot([0, *steps], [row["fresh"], *losses], marker="o", markersize=3, label=name)
        by_time.plot([0, *seconds], [row["fresh"], *losses], marker="o", markersize=3, label=name)
    for axis, label in ((by_step, "training steps"), (by_time, "training seconds (mean over seeds)")):
        axis.set_xlabel(label)
        axis.set_ylabel("held-out loss (nats/token)")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
