"""Uptraining throughput of the real recipe on a GPU (tokens/s that the recipe's budget is planned on).

Builds a random-weight SmolLM2-135M from a config folder (weights do not change the speed), then runs
`cli.py train recipes/smollm2-135m-b4.yaml` for a few steps (bf16, 256 x 2048 tokens a step) on a small
token folder, and reports the median step time after warm-up. Run where a GPU is:
    python benchmarks/gpu_uptrain.py CONFIG_DIR DATA_DIR WORK_DIR [--steps 12]
Prints a markdown report and writes it to WORK_DIR/gpu-uptrain.md.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    source = args.work_dir / "source"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_dir), dtype=torch.float32)
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(args.config_dir).save_pretrained(source)
    out = args.work_dir / "run"
    command = [sys.executable, str(REPO / "cli.py"), "train", str(REPO / "recipes" / "smollm2-135m-b4.yaml"),
               f"source={source}", f"data={args.data_dir}", f"output_dir={out}", f"max_steps={args.steps}",
               "warmup_steps=2", f"eval_every={args.steps}", "eval_windows=4", f"save_every={args.steps}",
               "tracker=none"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [entry["train/step_seconds"] for entry in log[2:]]  # after two warm-up steps
    tokens = 256 * 2048
    median = statistics.median(steps)
    report = f"""# Uptraining throughput on a GPU

`python benchmarks/gpu_uptrain.py` on {torch.cuda.get_device_name(0)} ({time.strftime('%Y-%m-%d')}),
torch {torch.__version__}: recipe `smollm2-135m-b4.yaml` (SmolLM2-135M shape, 15/15, L_B 4, bf16 autocast,
micro-batch 16 x 2048, global batch 256 x 2048 = {tokens:,} tokens a step, one GPU, 16 accumulation steps),
random weights, {args.steps} steps; median over steps 3..{args.steps}.

| | |
|---|---|
| seconds per optimizer step | {median:.2f} (min {min(steps):.2f}, max {max(steps):.2f}) |
| training tokens per second | {tokens / median:,.0f} |
| first / last training loss | {log[0]['train/loss']:.3f} / {log[-1]['train/loss']:.3f} |
| wall time of the whole command | {wall:.0f} s |
| the recipe's 57,200 steps at this rate, one GPU | {57200 * median / 3600:.1f} h |
"""
    (args.work_dir / "gpu-uptrain.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
