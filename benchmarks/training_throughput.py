"""Training throughput, MFU and peak memory of the uptraining loop, block and vanilla, variant by variant.

Each variant runs in its own process through the real `Trainer` (recipe overrides on
`recipes/smollm2-135m-b4.yaml`): setup (a block variant converts the source first), warm-up steps
(compilation happens there), then timed optimizer steps, synchronised, median reported. Random weights of
the source's shape (`models.random_source`: speed does not depend on the values) and the installed
docstrings tokenized with the source's tokenizer (`corpus.installed_docstring_tokens`). Results are
appended to a JSON file after each variant, so a run cut short keeps what it measured; `--profile` adds a
profiler table (CUDA time by op) of one optimizer step of the first variant.

    python benchmarks/training_throughput.py CONFIG_DIR WORK_DIR --output RESULTS.json [--variants a,b]

CONFIG_DIR holds a source model's config.json and tokenizer (e.g. SmolLM2-135M's); nothing is downloaded.
The recipe's conversion takes 15 block layers: for a smaller shape, pass `--set convert.block_layers=N`.
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from uptrain.corpus import installed_docstring_tokens
from uptrain.models import random_source

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-b4.yaml"
# name -> recipe overrides. plain: full float32 logits; fast: the chunked LM head and loss; compile: apply_compile.
VARIANTS = {
    "block-plain-mb16": dict(architecture="block", fast_loss=False, compile=False, micro_batch_size=16),
    "block-fast-mb16": dict(architecture="block", fast_loss=True, compile=False, micro_batch_size=16),
    "block-fast-compile-mb16": dict(architecture="block", fast_loss=True, compile=True, micro_batch_size=16),
    "block-fast-compile-mb32": dict(architecture="block", fast_loss=True, compile=True, micro_batch_size=32),
    "block-fast-compile-mb64": dict(architecture="block", fast_loss=True, compile=True, micro_batch_size=64),
    # distillation: the teacher is the (random-weight) vanilla source, frozen, in bf16
    "block-distill-compile-mb16": dict(architecture="block", fast_loss=True, compile=True, micro_batch_size=16,
                                       **{"distill.enabled": True}),
    "vanilla-plain-mb16": dict(architecture="vanilla", fast_loss=False, compile=False, micro_batch_size=16),
    "vanilla-fast-compile-mb16": dict(architecture="vanilla", fast_loss=True, compile=True, micro_batch_size=16),
    "vanilla-fast-compile-mb32": dict(architecture="vanilla", fast_loss=True, compile=True, micro_batch_size=32),
}


def run_variant(name: str, overrides: dict, source: Path, data: Path, work: Path, warmup: int, steps: int,
                accumulation: int, profile: bool, extra: list[str]) -> dict:
    from uptrain.flops import peak_flops
    from uptrain.recipe import load_recipe
    from uptrain.train import Trainer

    micro = overrides["micro_batch_size"]
    # kernel tuning off unless --set turns it on: minutes of compilation for a few steps
    values = dict(source=source, data=data, output_dir=work / f"run-{name}", tracker="none",
                  global_batch_size=micro * accumulation, max_steps=warmup + steps, warmup_steps=2,
                  compile_tuning=False, **overrides)
    recipe = load_recipe(RECIPE, [f"{key}={value}" for key, value in values.items()] + extra)
    trainer = Trainer(recipe)
    started = time.perf_counter()
    trainer.setup()
    setup_seconds = time.perf_counter() - started
    trainer.model.train()
    device = trainer.accelerator.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(warmup + steps):
        began = time.perf_counter()
        metrics = trainer.train_step(step)
        if cuda:  # the step's last kernels (the optimizer update) run after train_step returns
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        losses.append(float(metrics["loss"]))
    timed = times[warmup:]
    tokens = recipe.global_batch_size * recipe.seq_len
    median = statistics.median(timed)
    peak = peak_flops(device)
    result = {
        "variant": name, **overrides, "global_batch_size": recipe.global_batch_size,
        "seq_len": recipe.seq_len, "tokens_per_step": tokens, "step_seconds_median": median,
        "step_seconds": timed, "warmup_seconds": times[:warmup], "tokens_per_s": tokens / median,
        "flops_per_token": trainer.flops_per_token,
        "mfu": tokens / median * trainer.flops_per_token / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "setup_seconds": setup_seconds,
        "first_loss": losses[0], "last_loss": losses[-1],
        "fast_loss_used": trainer.accelerator.unwrap_model(trainer.model).fast,
    }
    if profile:
        result["profile"] = profile_step(trainer, warmup + steps)
    return result


def profile_step(trainer, step: int) -> str:
    """Top ops by CUDA time over one optimizer step, as the profiler's table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = trainer.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        trainer.train_step(step)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)


def run_child(command: list[str], name: str, output: Path, timeout_s: float | None) -> dict:
    """One variant in its own process -> its result, or {"variant", "error"} with the last lines of its stderr; a
    failed variant's whole stderr goes beside OUTPUT (OUTPUT-VARIANT.stderr.txt), since an error's cause is often
    at the top of a long trace."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        stdout, stderr, failed = done.stdout, done.stderr, done.returncode != 0
        reason = f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as stopped:  # killed: what it printed so far is kept
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr, failed = decode(stopped.stdout), decode(stopped.stderr), True
        reason = f"stopped after {timeout_s:.0f} s"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if lines and not failed:
        return json.loads(lines[-1].removeprefix("RESULT "))
    log = output.with_name(f"{output.stem}-{name}.stderr.txt")
    log.write_text(stderr)
    return {"variant": name, "error": [reason, *stderr.strip().splitlines()[-5:]], "stderr_file": str(log)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--data", type=Path, help="a prepared token folder (default: docstrings, prepared here)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--profile", action="store_true", help="profile one step of the first variant")
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides key=value for every variant")
    parser.add_argument("--variant-timeout-s", type=float,
                        help="stop a variant after this many seconds and record it as failed (default: no limit)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    source = random_source(args.config_dir, args.work_dir / "source")
    data = args.data or installed_docstring_tokens(args.work_dir / "tokens", source)
    names = args.variants.split(",")
    if args.one:
        result = run_variant(args.one, VARIANTS[args.one], source, data, args.work_dir, args.warmup, args.steps,
                             args.accumulation, args.profile, args.set)
        print("RESULT " + json.dumps(result))
        return
    results = json.loads(args.output.read_text()) if args.output.is_file() else []
    for index, name in enumerate(names):
        command = [sys.executable, __file__, str(args.config_dir), str(args.work_dir), "--output", str(args.output),
                   "--data", str(data),
                   "--one", name, "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--accumulation", str(args.accumulation), "--set", *args.set]
        command += ["--profile"] if args.profile and index == 0 else []
        results.append(run_child(command, name, args.output, args.variant_timeout_s))
        args.output.write_text(json.dumps(results, indent=1) + "\n")
        row = results[-1]
        if "error" in row:
            print(f"{name}: FAILED {row['error']}", flush=True)
        else:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
            memory = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] else "-"
            print(f"{name}: {row['tokens_per_s']:,.0f} tok/s, MFU {mfu}, step {row['step_seconds_median']:.3f} s, "
                  f"peak {memory}, loss {row['first_loss']:.3f}->{row['last_loss']:.3f}", flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
