"""The fast training path against the plain one on a GPU: the same run, two loss curves, one plot.

Runs `cli.py train recipes/smollm2-135m-b4.yaml` twice on the same random-weight source of CONFIG_DIR's
shape (`models.random_source`, converted by each run) and real text (the installed docstrings, tokenized with
the source's tokenizer): the fast path (chunked LM head and loss, compiled, fused AdamW) and the plain path
(full logits, eager), bf16 autocast, same data order and schedule, the loss logged at every step.
Writes each run's log as OUT_DIR/curve-LABELNAME.jsonl, then a JSON summary and a PNG over every curve in
OUT_DIR, so that runs of two code trees (e.g. the previous commit's, run from its own copy with
`--label previous-`) land in one comparison.

    python benchmarks/training_equivalence.py CONFIG_DIR WORK_DIR OUT_DIR [--steps 200] [--paths fast,plain]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from uptrain.corpus import installed_docstring_tokens
from uptrain.models import random_source

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-b4.yaml"
PATHS = {"fast": dict(fast_loss="true", compile="true"), "plain": dict(fast_loss="false", compile="false")}
GLOBAL_BATCH = 32  # sequences of 2048 tokens a step
LABELS = {"fast": "chunked head + loss, compiled", "plain": "full float32 logits, eager"}


def read_log(path: Path) -> dict:
    train, val = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        train[record["step"]] = record["train/loss"]
        if "eval/val_loss" in record:
            val[record["step"]] = record["eval/val_loss"]
    return {"train": train, "val": val}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", type=Path, help="a prepared token folder (default: docstrings, prepared here)")
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides key=value for every run")
    parser.add_argument("--paths", default="fast,plain", help="comma-separated names of PATHS to run")
    parser.add_argument("--label", default="", help="prefix of this tree's curve names, e.g. 'previous-'")
    parser.add_argument("--summarise-only", action="store_true", help="only compare the curves in OUT_DIR")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.summarise_only:
        return summarise(args.out_dir, GLOBAL_BATCH)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    source = random_source(args.config_dir, args.work_dir / "source")
    data = args.data or installed_docstring_tokens(args.work_dir / "tokens", source)
    settings = dict(source=source, data=data, micro_batch_size=16, global_batch_size=GLOBAL_BATCH,
                    max_steps=args.steps, warmup_steps=20, lr=1e-3, eval_every=50, eval_windows=16,
                    save_every=args.steps, log_every=1, tracker="none",
                    compile_tuning="false")  # tuning: minutes of compilation, the same function
    for name in args.paths.split(","):
        out = args.work_dir / f"curve-{args.label}{name}"
        overrides = {**settings, **PATHS[name], "output_dir": out, "resume": "none"}
        command = [sys.executable, str(REPO / "cli.py"), "train", str(RECIPE),
                   *[f"{k}={v}" for k, v in overrides.items()], *args.set]
        subprocess.run(command, check=True, cwd=REPO)
        (args.out_dir / f"curve-{args.label}{name}.jsonl").write_text((out / "train_log.jsonl").read_text())
    summarise(args.out_dir, settings["global_batch_size"])


def summarise(out_dir: Path, global_batch_size: int) -> None:
    """Every curve in out_dir against the reference: `plain` (full float32 logits, eager), else the first."""
    logs = {path.stem.removeprefix("curve-"): read_log(path) for path in sorted(out_dir.glob("curve-*.jsonl"))}
    reference = next((name for name in logs if name.endswith("plain")), next(iter(logs)))
    steps = sorted(logs[reference]["train"])
    curves = {name: [log["train"].get(s) for s in steps] for name, log in logs.items()}
    comparisons = {}
    for name, curve in curves.items():
        late = [abs(a - b) for s, a, b in zip(steps, curve, curves[reference]) if s > 10 and a is not None]
        if name != reference and late:
            comparisons[name] = {"mean_abs_difference_after_step_10": statistics.mean(late),
                                 "max_abs_difference_after_step_10": max(late)}
    summary = {
        "steps": len(steps), "global_batch_size": global_batch_size, "reference": reference,
        "first_loss": {name: curve[0] for name, curve in curves.items()},
        "last_loss": {name: curve[-1] for name, curve in curves.items()},
        "against_reference": comparisons, "val_loss": {name: log["val"] for name, log in logs.items()},
    }
    (out_dir / "equivalence.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    markers = iter("oxs^vd")
    for name, curve in curves.items():
        wide = name == reference
        axis.plot(steps, curve, label=f"{name}: {LABELS.get(name.rsplit('-', 1)[-1], '')}",
                  linewidth=2.5 if wide else 1, alpha=0.6 if wide else 1)
        val = logs[name]["val"]
        axis.scatter(list(val), list(val.values()), marker=next(markers), label=f"held-out, {name}")
    axis.set_xlabel(f"optimizer step ({global_batch_size} x 2048 tokens)")
    axis.set_ylabel("training cross-entropy (nats)")
    axis.set_title("SmolLM2-135M shape, block 15/15 L_B 4, bf16, random init")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "training-equivalence.png", dpi=120)


if __name__ == "__main__":
    main()
