"""Recovery of converted models under several uptraining methods, on the same tokens and held-out windows.

    python benchmarks/recovery.py train PLAN.yaml OUT [--only NAME ...] [--seeds 0,1]
    python benchmarks/recovery.py score PLAN.yaml OUT [--device cuda] [--zero-shot DIR] [--zero-shot-items N]
    python benchmarks/recovery.py report OUT

`train`: PLAN (YAML, keys below) names a source, prepared data (`uptrain data prepare`), a base recipe and a
list of runs; each run is a conversion (options of `uptrain convert` over the plan's `convert:`, the floor)
and recipe overrides, trained once per seed with `uptrain train`'s loop. Conversions are made once per set of
options (OUT/converted/) and scored before training on the first `eval_windows` held-out windows, the windows
the trainer evaluates on every `eval_every` steps. A run already in OUT/results.json is not trained again
(remove it there to redo it).

`score`: the source, every fresh conversion and every run's final model, in float32 on one device, on the
same held-out windows, on an out-of-domain text (`ood`), on zero-shot tasks (the first N items of each, the
same items for every model; DIR holds the requests files, default the toolkit's cache), and greedy samples
of fixed prompts -> OUT/scores.json.

`report`: OUT/recovery.md (tables: held-out loss by step, mean and spread over seeds, the fraction of the
gap from the plain fresh conversion to the vanilla fine-tune each run closes; scores) and OUT/recovery.png
(held-out loss against steps and against training seconds).

PLAN keys:
    source: default                 # any `uptrain convert` SOURCE
    data: /path/to/tokens           # an `uptrain data prepare` folder with a val split
    recipe: tiny-cpu                # a shipped recipe name or a YAML path: the shared settings
    convert: {token_input_layers: 0, sink: none}  # the conversion every run starts from (its `convert:` on top)
    overrides: [max_steps=60, eval_every=15, eval_windows=64, log_every=1]
    seeds: [0, 1]
    ood: /path/to/text.jsonl        # optional (score)
    ood_windows: 64
    prompts: ["The history of", ...] # optional (score): greedy samples, 48 new tokens each
    runs:
      - name: ce                    # the plain conversion, cross-entropy
      - name: distill
        overrides: [distill.enabled=true]
      - name: input2-sink
        convert: {token_input_layers: 2, sink: source}
      - name: vanilla               # the source fine-tuned on the same tokens: the ceiling
        architecture: vanilla
Runs need `log_every=1` so that every step's time is logged.
"""

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

CONVERSIONS = "converted"  # OUT/converted/<key>: one folder per set of conversion options
RUNS = "runs"  # OUT/runs/<name>-s<seed>: each run's output_dir (train_log.jsonl, final/)
CEILING = "vanilla"  # the run name whose curve is the ceiling of the gap fractions
BASELINE = "ce"  # the run whose fresh conversion is the floor
SAMPLE_TOKENS = 48
# The paper's conversion, the one every run's `convert:` options change: no token input layers, no sink, no norm.


def conversion_key(options: dict) -> str:
    """A folder name for a set of conversion options: 'default' (the plain conversion) or its sorted key-value
    pairs."""
    if not options:
        return "default"
    return "-".join(f"{key}={value}" for key, value in sorted(options.items())).replace("_", "-")


def source_spec(plan: dict) -> str:
    from uptrain.default_model import default_model_path

    return str(default_model_path()) if plan["source"] == "default" else plan["source"]


def base_recipe(plan: dict, overrides: list[str]):
    from uptrain.recipe import load_recipe
    from uptrain.shipped_recipes import recipe_path

    return load_recipe(recipe_path(plan["recipe"]), [f"data={plan['data']}", *plan.get("overrides", []), *overrides])


def heldout_windows(plan: dict) -> list[torch.Tensor]:
    """The windows the trainer evaluates on: the first `eval_windows` windows of seq_len tokens of the val split."""
    from uptrain.data import TokenData

    recipe = base_recipe(plan, [])
    return list(TokenData(plan["data"], "val").windows(recipe.seq_len, recipe.eval_windows))


@torch.no_grad()
def heldout_loss(model, windows: list[torch.Tensor]) -> float:
    """Mean next-token loss over the windows, one window at a time, as the trainer's `validate` computes it."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in windows:
        ids = window[None].to(device)
        logits = model(ids).logits.float()  # (1, T, V)
        total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def converted(plan: dict, options: dict, out: Path) -> Path:
    """The folder of the source converted with the recipe's block length, block layers, method and prefix length,
    the plan's `convert:` options (the floor's conversion), then the run's `options`."""
    from uptrain.convert import ConvertOptions, convert

    folder = out / CONVERSIONS / conversion_key(options)
    if not (folder / "config.json").is_file():
        section = base_recipe(plan, []).convert
        settings = {key: getattr(section, key) for key in ("block_length", "block_layers", "method", "prefix_length")}
        options = {**settings, **plan.get("convert", {}), **options}
        convert(source_spec(plan), folder, ConvertOptions(**options), overwrite=True)
    return folder


def read_curve(output_dir: Path, tokens_per_step: int) -> list[dict]:
    """One point per evaluated step of a run's train_log.jsonl: {step, tokens, loss (held-out), seconds, elapsed}.
    `elapsed` sums every logged step's own time up to that step (evaluation not counted); `seconds` is the step
    count times the run's median step time, which a busy machine's slow steps do not distort."""
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    step_times = [row["train/step_seconds"] for row in rows if "train/step_seconds" in row]
    median = statistics.median(step_times) if step_times else 0.0
    points, elapsed = [], 0.0
    for row in rows:
        elapsed += row.get("train/step_seconds", 0.0)
        if "eval/val_loss" in row:
            points.append(
                {
                    "step": row["step"],
                    "tokens": row["step"] * tokens_per_step,
                    "loss": row["eval/val_loss"],
                    "seconds": row["step"] * median,
                    "elapsed": elapsed,
                }
            )
    return points


def train_run(plan: dict, run: dict, seed: int, out: Path, results: dict) -> dict:
    """Convert (once per options), score the fresh conversion (once), train, read the curve."""
    from uptrain.inference import load_for_inference
    from uptrain.train import train

    source = source_spec(plan)
    output_dir = out / RUNS / f"{run['name']}-s{seed}"
    overrides = [f"seed={seed}", "resume=none", "tracker=none", f"output_dir={output_dir}", *run.get("overrides", [])]
    record = {
        "name": run["name"],
        "seed": seed,
        "convert": run.get("convert", {}),
        "overrides": run.get("overrides", []),
    }
    if run.get("architecture", "block") == "vanilla":
        overrides += [f"source={source}", "architecture=vanilla"]
        model_spec, record["start"] = source, "source"
    else:
        folder = converted(plan, run.get("convert", {}), out)
        overrides += [f"source={folder}", f"distill.teacher={source}"]
        model_spec, record["start"] = str(folder), folder.name
    if record["start"] not in results["fresh"]:
        model = load_for_inference(model_spec, dtype="float32")[0]
        results["fresh"][record["start"]] = heldout_loss(model, heldout_windows(plan))
    recipe = base_recipe(plan, overrides)
    started = time.perf_counter()
    facts = train(recipe)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # the final model stays; optimizer states go
    record.update(
        wall_seconds=time.perf_counter() - started,
        tokens=facts["tokens"],
        steps=facts["steps"],
        final_model=facts["final_model"],
        curve=read_curve(output_dir, recipe.global_batch_size * recipe.seq_len),
    )
    return record


def train_command(args) -> None:
    plan = yaml.safe_load(args.plan.read_text())
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else plan.get("seeds", [0])
    runs = [run for run in plan["runs"] if not args.only or run["name"] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "fresh": {}}
    results["plan"] = plan
    for run in runs:
        for seed in seeds:
            key = f"{run['name']}-s{seed}"
            if key not in results["runs"]:
                results["runs"][key] = train_run(plan, run, seed, args.out, results)
                path.write_text(json.dumps(results, indent=2) + "\n")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(curve_table(results))


# -- scoring ---------------------------------------------------------------------------------------------------


def score_command(args) -> None:
    """Every model of the plan's runs on the same windows, texts, task items and prompts, on one device."""
    from uptrain.evaluate import read_documents, score, text_windows
    from uptrain.inference import load_for_inference
    from uptrain.tasks import TASKS, read_requests
    from uptrain.zero_shot import evaluate_tasks

    plan = yaml.safe_load(args.plan.read_text())
    results = json.loads((args.out / "results.json").read_text())
    models = {"source": source_spec(plan)}
    models.update(
        {f"fresh {name}": str(args.out / CONVERSIONS / name) for name in results["fresh"] if name != "source"}
    )
    models.update({key: record["final_model"] for key, record in results["runs"].items()})
    windows = heldout_windows(plan)
    requests = {}
    if args.zero_shot_items:
        folder = args.zero_shot
        for name in TASKS:
            path = folder / f"{name}.jsonl.gz" if folder else None
            requests[name] = read_requests(name, args.zero_shot_items, path=path)
    path = args.out / "scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    for label, spec in models.items():
        if label in scores:
            continue
        started = time.perf_counter()
        model, tokenizer = load_for_inference(spec, device=args.device, dtype="float32")
        entry = {"held_out": heldout_loss(model, windows)}
        if plan.get("ood"):
            ood = text_windows(
                tokenizer, read_documents([plan["ood"]]), windows[0].numel(), plan.get("ood_windows", 64)
            )
            entry["ood"] = score(model, tokenizer, ood, batch_size=8, label=label)["loss"]
        if requests:
            entry["zero_shot"] = evaluate_tasks(model, tokenizer, requests, batch_size=32, label=label)
        entry["samples"] = samples(model, tokenizer, plan.get("prompts", []))
        entry["seconds"] = time.perf_counter() - started
        scores[label] = entry
        path.write_text(json.dumps(scores, indent=2) + "\n")
        del model
    print(score_table(scores))


@torch.no_grad()
def samples(model, tokenizer, prompts: list[str]) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        output = model.generate(ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


# -- report ----------------------------------------------------------------------------------------------------


def summary(results: dict) -> dict[str, dict]:
    """Per run name: its fresh conversion's loss and, at every evaluated step, the mean held-out loss over
    the seeds, their spread (max - min), the mean training seconds and the tokens."""
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
            "fresh": results["fresh"][records[0]["start"]],
            "seeds": len(records),
            "steps": sorted(points),
            "mean": {step: statistics.mean(p["loss"] for p in group) for step, group in points.items()},
            "spread": {
                step: max(p["loss"] for p in group) - min(p["loss"] for p in group) for step, group in points.items()
            },
            "seconds": {step: statistics.mean(p["seconds"] for p in group) for step, group in points.items()},
            "tokens": {step: group[0]["tokens"] for step, group in points.items()},
        }
    return rows


def gap_closed(rows: dict, name: str, step: int) -> float | None:
    """(fresh plain conversion - run) / (fresh plain conversion - vanilla fine-tune), at `step`; past the
    vanilla fine-tune's last evaluation, against that last one (a run longer than the ceiling's)."""
    if BASELINE not in rows or CEILING not in rows:
        return None
    ceiling = rows[CEILING]["mean"]
    floor = rows[BASELINE]["fresh"]
    reference = ceiling.get(step, ceiling[max(ceiling)] if step > max(ceiling) else None)
    if reference is None:
        return None
    return (floor - rows[name]["mean"][step]) / (floor - reference)


def curve_table(results: dict) -> str:
    rows = summary(results)
    steps = sorted({step for row in rows.values() for step in row["mean"]})
    head = (
        "| run | seeds | fresh | " + " | ".join(f"step {s}" for s in steps) + " | gap closed (last) | seconds (last) |"
    )
    lines = [head, "|---|---:|---:|" + "---:|" * len(steps) + "---:|---:|"]
    for name, row in rows.items():
        cells = []
        for step in steps:
            if step not in row["mean"]:
                cells.append("")
                continue
            spread = f" ±{row['spread'][step] / 2:.3f}" if row["seeds"] > 1 else ""
            cells.append(f"{row['mean'][step]:.3f}{spread}")
        last = row["steps"][-1]
        closed = gap_closed(rows, name, last)
        closed = f"{closed:.1%}" if closed is not None else ""
        lines.append(
            f"| {name} | {row['seeds']} | {row['fresh']:.3f} | "
            + " | ".join(cells)
            + f" | {closed} | {row['seconds'][last]:.0f} |"
        )
    return "\n".join(lines)


def score_table(scores: dict) -> str:
    tasks = sorted({task for entry in scores.values() for task in entry.get("zero_shot", {})})
    head = "| model | held-out | ood | " + " | ".join(tasks) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(tasks)]
    for label, entry in scores.items():
        accuracy = [
            f"{entry['zero_shot'][task]['acc']:.3f}" if task in entry.get("zero_shot", {}) else "" for task in tasks
        ]
        ood = f"{entry['ood']:.3f}" if "ood" in entry else ""
        lines.append(f"| {label} | {entry['held_out']:.3f} | {ood} | " + " | ".join(accuracy) + " |")
    return "\n".join(lines)


def report_command(args) -> None:
    results = json.loads((args.out / "results.json").read_text())
    text = ["## Held-out loss by step (mean over seeds, ± half the spread)", "", curve_table(results), ""]
    scores_path = args.out / "scores.json"
    if scores_path.is_file():
        text += ["## Scores", "", score_table(json.loads(scores_path.read_text())), ""]
    (args.out / "recovery.md").write_text("\n".join(text))
    plot(results, args.out / "recovery.png")
    print("\n".join(text))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 5))
    for name, row in summary(results).items():
        steps = row["steps"]
        losses = [row["fresh"], *(row["mean"][step] for step in steps)]
        by_tokens.plot(
            [0, *(row["tokens"][step] / 1e6 for step in steps)], losses, marker="o", markersize=3, label=name
        )
        by_time.plot([0, *(row["seconds"][step] for step in steps)], losses, marker="o", markersize=3, label=name)
    labels = ((by_tokens, "training tokens (millions)"), (by_time, "training seconds (steps x median step time)"))
    for axis, label in labels:
        axis.set_xlabel(label)
        axis.set_ylabel("held-out loss (nats/token)")
        axis.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("plan", type=Path)
    train.add_argument("out", type=Path)
    train.add_argument("--only", nargs="*", help="train only these runs (by name)")
    train.add_argument("--seeds", help="comma-separated seeds, replacing the plan's")
    score = commands.add_parser("score")
    score.add_argument("plan", type=Path)
    score.add_argument("out", type=Path)
    score.add_argument("--device", default="cpu")
    score.add_argument("--zero-shot", type=Path, help="folder of the tasks' requests files (default: the cache)")
    score.add_argument("--zero-shot-items", type=int, default=0, help="first N items of each task (0: none)")
    report = commands.add_parser("report")
    report.add_argument("out", type=Path)
    args = parser.parse_args()
    {"train": train_command, "score": score_command, "report": report_command}[args.command](args)


if __name__ == "__main__":
    main()
