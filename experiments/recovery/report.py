"""Figures and a summary of a recovery-protocol run (protocol.py), from its small results only.

    python experiments/recovery/report.py RESULTS_DIR [RESULTS_DIR ...] --out docs/results/recovery-small-scale/recovery

RESULTS_DIR: unpacked result archives (runs/*/train_log.jsonl, scores.json, bench/*.json); later folders
add runs to earlier ones. Writes OUT.png (held-out loss against steps and against training tokens) and
OUT.json (curves, scores, throughput per run).
"""

import argparse
import json
import statistics
from pathlib import Path

SCRATCH = ("vanilla", "block-scratch")  # trained from random weights; the uptrained runs start from vanilla


def read_run(log: Path) -> dict:
    """Held-out curve, tokens per step and median step throughput of one run's train_log.jsonl."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rate = [row["train/step_tokens_per_s"] for row in rows if row["step"] > 5]  # past compile and warm-up
    mfu = [row["train/mfu"] for row in rows if row["step"] > 5 and "train/mfu" in row]
    return {
        "steps": rows[-1]["step"],
        "eval": {row["step"]: row["eval/val_loss"] for row in rows if "eval/val_loss" in row},
        "tokens_per_s": statistics.median(rate),
        "mfu": statistics.median(mfu) if mfu else None,
    }


def collect(folders: list[Path]) -> dict:
    runs, scores, bench = {}, {}, None
    for folder in folders:
        for log in sorted(folder.glob("runs/*/train_log.jsonl")):
            runs[log.parent.name] = read_run(log)
        if (folder / "scores.json").is_file():
            scores.update(json.loads((folder / "scores.json").read_text()))
        for path in sorted(folder.glob("bench/*.json")):
            bench = json.loads(path.read_text())
    return {"runs": runs, "scores": scores, "bench": bench}


def plot(summary: dict, tokens_per_step: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    pretraining = runs["vanilla"]["steps"] * tokens_per_step
    figure, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(13, 5))
    for name, run in runs.items():
        steps = list(map(int, run["eval"]))
        losses = list(run["eval"].values())
        style = "-" if name in SCRATCH else "--"
        by_step.plot(steps, losses, style, marker="o", markersize=3, label=name)
        offset = 0 if name in SCRATCH else pretraining
        by_tokens.plot([offset + s * tokens_per_step for s in steps], losses, style, marker="o",
                       markersize=3, label=name)
    fresh = summary["scores"].get("fresh-conversion", {}).get("heldout", {}).get("loss")
    final = list(runs["block-scratch"]["eval"].values())[-1]
    for axis in (by_step, by_tokens):
        axis.axhline(final, color="grey", linewidth=0.8, linestyle=":")
    by_step.set(xlabel="training steps of the run itself (128 x 1024 tokens each)",
                ylabel="held-out loss (nats, first 128 validation windows)",
                title="Held-out loss against the run's own steps")
    by_tokens.set(xlabel="training tokens, pretraining included (uptrained runs start at vanilla's 78.6M)",
                  ylabel="held-out loss (nats)", title="Against all training tokens spent")
    by_tokens.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e6:.0f}M"))
    for axis in (by_step, by_tokens):
        axis.set_ylim(3.6, 6.5)
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    if fresh:
        figure.suptitle(f"Recovery protocol, 50M Llama shape (fresh conversion scores {fresh:.2f} nats on 256 windows)")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix; .png and .json are written")
    parser.add_argument("--tokens-per-step", type=int, default=128 * 1024)
    args = parser.parse_args()
    summary = collect(args.results)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.tokens_per_step, args.out)


if __name__ == "__main__":
    main()
