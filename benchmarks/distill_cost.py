"""What distillation adds to an uptraining step: time and peak memory with and without the teacher.

Runs `uptrain train recipes/tiny-cpu.yaml` on SmolLM2-135M-Instruct (converted 15/15, L_B 4) for a few
steps, once plainly and once with `distill.enabled=true` (teacher: the vanilla source), and compares the
median step time (from train_log.jsonl) and peak resident memory. Writes docs/distillation.md.
Usage: python benchmarks/distill_cost.py [--steps 8] [--seq-len 256] [--batch 4]
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(extra: list[str], out: Path, args) -> tuple[float, float]:
    """(median seconds a step after the first, peak RSS GiB) of one training subprocess."""
    command = [sys.executable, str(REPO / "cli.py"), "train", str(REPO / "recipes" / "tiny-cpu.yaml"),
               f"output_dir={out}", f"max_steps={args.steps}", f"seq_len={args.seq_len}",
               f"micro_batch_size={args.batch}", f"global_batch_size={args.batch}", "eval_every=1000",
               f"save_every={args.steps}", "tracker=none", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, check=True, cwd=REPO)
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024 / 2**30
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(entry["train/step_seconds"] for entry in log[1:]), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from uptrain.corpus import write_docstring_corpus
    from uptrain.data import prepare
    from uptrain.default_model import default_model_path
    from uptrain.sources import load_model, load_tokenizer, resolve

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        source_ref = resolve(str(default_model_path()))
        tokenizer = load_tokenizer(source_ref)
        load_model(source_ref).save_pretrained(work / "source")
        tokenizer.save_pretrained(work / "source")
        prepare(str(write_docstring_corpus(work / "corpus.jsonl")), work / "data", tokenizer, tokenizer_name="smollm2")
        common = [f"source={work / 'source'}", f"data={work / 'data'}"]
        plain = run(common, work / "plain", args)
        common[0] = f"source={work / 'plain' / 'converted'}"  # reuse the conversion
        distill = run([*common, "distill.enabled=true", f"distill.teacher={work / 'source'}"], work / "distill", args)
    report = f"""# The cost of distillation

Measured by `python benchmarks/distill_cost.py --steps {args.steps} --seq-len {args.seq_len} --batch {args.batch}`
on {time.strftime('%Y-%m-%d')}: {platform.machine()} CPU (2 cores), float32. Student: SmolLM2-135M-Instruct
converted 15/15, L_B 4; teacher: the vanilla SmolLM2-135M-Instruct, frozen, forward only.
{args.batch} x {args.seq_len} tokens a step; median step time over steps 2..{args.steps}; peak resident
memory of the training process (the plain run converts the model first, so its peak includes that).

| | seconds / step | peak memory (GiB) |
|---|---|---|
| cross-entropy only | {plain[0]:.2f} | {plain[1]:.2f} |
| distillation (weight 0.5, T 1) | {distill[0]:.2f} | {distill[1]:.2f} |
| added by distillation | {distill[0] - plain[0]:+.2f} ({100 * (distill[0] / plain[0] - 1):+.0f}%) | {distill[1] - plain[1]:+.2f} |

The teacher costs one extra forward pass of the vanilla model per micro-batch (about 40% of a block
training step's FLOPs for an equal-size teacher: 270 against 665 MFLOP a token), its weights and its final
states (B, T, D). With the fast loss neither model's (B, T, V) logits exist: the teacher's are made chunk by
chunk beside the student's, and the KL and its gradient are computed per chunk. On a GPU the teacher runs
in the run's half precision (bf16); its GPU cost has not been measured yet.
"""
    (REPO / "docs" / "distillation.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
