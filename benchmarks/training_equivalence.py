"""The fast training path against the plain one on a GPU: the same run, two loss curves, one plot.

Runs `cli.py train recipes/smollm2-135m-b4.yaml` twice on the same random-weight source and real text
(standard-library docstrings, tokenized with the source's tokenizer): the fast path (chunked LM head and
loss, compiled decoder layers, fused AdamW) and the plain path (full logits, eager layers), bf16 autocast,
same data order and schedule. Writes both logs, a PNG of the curves and a JSON summary.

    python benchmarks/training_equivalence.py CONFIG_DIR WORK_DIR OUT_DIR [--steps 200]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from training_throughput import RECIPE, setup  # noqa: E402

PATHS = {"fast": dict(fast_loss="true", compile="true"), "plain": dict(fast_loss="false", compile="false")}


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
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides key=value for both runs")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _, source, data = setup(args.config_dir, args.work_dir, args.data)  # the converted random-weight model
    settings = dict(source=source, data=data, micro_batch_size=16, global_batch_size=32, max_steps=args.steps,
                    warmup_steps=20, lr=1e-3, eval_every=50, eval_windows=16, save_every=args.steps, log_every=10,
                    tracker="none")
    logs = {}
    for name, path_settings in PATHS.items():
        out = args.work_dir / f"curve-{name}"
        overrides = {**settings, **path_settings, "output_dir": out, "resume": "none"}
        command = [sys.executable, str(REPO / "cli.py"), "train", str(RECIPE),
                   *[f"{k}={v}" for k, v in overrides.items()], *args.set]
        subprocess.run(command, check=True, cwd=REPO)
        logs[name] = read_log(out / "train_log.jsonl")
        (args.out_dir / f"curve-{name}.jsonl").write_text((out / "train_log.jsonl").read_text())

    steps = sorted(logs["fast"]["train"])
    fast = [logs["fast"]["train"][s] for s in steps]
    plain = [logs["plain"]["train"][s] for s in steps]
    late = [abs(a - b) for s, a, b in zip(steps, fast, plain) if s > 10]
    summary = {
        "steps": len(steps), "global_batch_size": settings["global_batch_size"],
        "first_loss": {"fast": fast[0], "plain": plain[0]}, "last_loss": {"fast": fast[-1], "plain": plain[-1]},
        "mean_abs_difference_after_step_10": statistics.mean(late), "max_abs_difference_after_step_10": max(late),
        "val_loss": {name: logs[name]["val"] for name in logs},
    }
    (args.out_dir / "equivalence.json").write_text(json.dumps(summary, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, plain, label="plain path (full float32 logits, eager)", linewidth=2.5, alpha=0.6)
    axis.plot(steps, fast, label="fast path (chunked head + loss, compiled layers)", linewidth=1)
    for name, marker in (("plain", "o"), ("fast", "x")):
        val = logs[name]["val"]
        axis.scatter(list(val), list(val.values()), marker=marker, label=f"held-out, {name}")
    axis.set_xlabel("optimizer step (32 x 2048 tokens)")
    axis.set_ylabel("training cross-entropy (nats)")
    axis.set_title("SmolLM2-135M shape, block 15/15 L_B 4, bf16, random init")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out_dir / "training-equivalence.png", dpi=120)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
