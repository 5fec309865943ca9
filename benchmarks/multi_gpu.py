"""One GPU against N GPUs with DDP and with FSDP: curves, speed, memory, resume, export, distillation.

Loss curves, tokens/s and peak memory per GPU of the three layouts; an FSDP checkpoint resumed under FSDP
and on one GPU; the FSDP export loaded on one device; distillation under each layout.

Every run is the real command line: `cli.py train` for one process, `accelerate launch --config_file
recipes/accelerate/{ddp,fsdp}.yaml --num_processes N cli.py train` for several, on
`recipes/smollm2-135m-b4.yaml` with a random-weight source of CONFIG_DIR's shape (`models.random_source`;
e.g. SmolLM2-135M's config), converted by each run (15/15), and a prepared token folder (`--data`, default
the installed docstrings, `corpus.installed_docstring_tokens`). The global batch is the same in every run,
so one process accumulates N times as many micro-batches and all runs see the same samples in the same order.

    python benchmarks/multi_gpu.py CONFIG_DIR WORK_DIR OUT_DIR [--gpus 2] [--steps 40] [--runs one,ddp,fsdp]

Runs (`--runs`, comma-separated; default all): one, ddp, fsdp, resume (the fsdp run cut back to its
middle checkpoint and resumed under FSDP and on one GPU; needs fsdp), distill (one, ddp and fsdp with
`distill.enabled`, teacher = the random-weight vanilla source, `--distill-steps` steps). Each invocation adds
to what earlier ones measured in OUT_DIR, so the set can be split: `--runs one,ddp,fsdp` then
`--runs resume,distill`, or run by run (`--runs distill-one,distill-ddp`). Then
OUT_DIR holds runs/NAME.jsonl (each run's train log), runs/NAME.json (its summary), multi-gpu.json (the
comparison) and multi-gpu.png.

`--cpu` runs the same pipeline on CPU processes (gloo; FSDP through tests/fsdp_on_cpu.py) to check the
script without a GPU; give it a tiny CONFIG_DIR and small `--set` sizes (`convert.block_layers` among them).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from uptrain.corpus import installed_docstring_tokens
from uptrain.models import random_source

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-b4.yaml"
CONFIGS = REPO / "recipes" / "accelerate"
CLI = REPO / "cli.py"
FSDP_ON_CPU = REPO / "tests" / "fsdp_on_cpu.py"
GROUPS = {
    "one": ["one"],
    "ddp": ["ddp"],
    "fsdp": ["fsdp"],
    "resume": ["fsdp-resumed-fsdp", "fsdp-resumed-one"],
    "distill": ["distill-one", "distill-ddp", "distill-fsdp"],
}
# a group's runs can be named one by one too, to split a group over several commands
GROUPS.update({name: [name] for names in list(GROUPS.values()) for name in names})
SKIP_STEPS = 5  # first steps left out of the throughput median: compilation, allocator warm-up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(layout: str, gpus: int, overrides: dict, cpu: bool) -> tuple[list[str], dict]:
    """(argv, environment) of one training run: layout one, ddp or fsdp."""
    env = dict(os.environ)
    args = [f"{key}={value}" for key, value in overrides.items()]
    if layout == "one":
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env.setdefault("CUDA_VISIBLE_DEVICES", "0")
        return [sys.executable, str(CLI), "train", str(RECIPE), *args], env
    script = CLI
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
        script = FSDP_ON_CPU if layout == "fsdp" else CLI
    launch = [
        "accelerate",
        "launch",
        "--config_file",
        str(CONFIGS / f"{layout}.yaml"),
        "--num_processes",
        str(gpus),
        "--main_process_port",
        str(free_port()),
    ]
    return [*launch, str(script), "train", str(RECIPE), *args], env


def read_log(path: Path) -> list[dict]:
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def summarize(name: str, layout: str, processes: int, records: list[dict], seconds: float, resumed_at: int = 0) -> dict:
    timed = [r for r in records if r["step"] > resumed_at + SKIP_STEPS]
    rates = [r["train/step_tokens_per_s"] for r in timed]
    rate = statistics.median(rates) if rates else None
    mfu = [r["train/mfu"] for r in timed if "train/mfu" in r]
    memory = [r["train/peak_memory_gib"] for r in records if "train/peak_memory_gib" in r]
    return {
        "run": name,
        "layout": layout,
        "processes": processes,
        "wall_seconds": seconds,
        "resumed_at": resumed_at,
        "steps": [r["step"] for r in records],
        "loss": [r["train/loss"] for r in records],
        "lr": [r["train/lr"] for r in records],
        "val_loss": {r["step"]: r["eval/val_loss"] for r in records if "eval/val_loss" in r},
        "tokens_per_s_median": rate,
        "tokens_per_s_per_gpu": rate / processes if rate else None,
        "step_seconds_median": statistics.median(r["train/step_seconds"] for r in timed) if timed else None,
        "mfu_median": statistics.median(mfu) if mfu else None,
        "peak_memory_gib_per_gpu": max(memory) if memory else None,
    }


def truncated(out: Path, copy: Path, step: int) -> None:
    """`copy`: the finished run `out` as it stood at `step` (later checkpoints, log lines, export removed)."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("final", ".final.partial"))
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    lines = (copy / "train_log.jsonl").read_text().splitlines()
    (copy / "train_log.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))


def train(
    name: str,
    layout: str,
    processes: int,
    overrides: dict,
    args,
    work: Path,
    out_dir: Path,
    resume_from: Path | None = None,
    resumed_at: int = 0,
) -> dict:
    folder = work / name
    if resume_from is not None:
        truncated(resume_from, folder, resumed_at)
        overrides = {**overrides, "resume": "auto"}
    else:
        shutil.rmtree(folder, ignore_errors=True)
        overrides = {**overrides, "resume": "none"}
    argv, env = command(layout, processes, {**overrides, "output_dir": folder}, args.cpu)
    print(f"[{name}] {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(argv, cwd=REPO, env=env, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed with exit status {completed.returncode}")
    shutil.copyfile(folder / "train_log.jsonl", out_dir / "runs" / f"{name}.jsonl")
    result = summarize(name, layout, processes, read_log(folder / "train_log.jsonl"), seconds, resumed_at)
    training = json.loads((folder / "final" / "training.json").read_text())
    result["distributed"] = training.get("distributed")
    (out_dir / "runs" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def curve_difference(run: dict, reference: dict, after: int = 0) -> dict | None:
    ref = dict(zip(reference["steps"], reference["loss"]))
    pairs = [(loss, ref[step]) for step, loss in zip(run["steps"], run["loss"]) if step > after and step in ref]
    if not pairs:
        return None
    diffs = [abs(a - b) for a, b in pairs]
    return {
        "steps": len(pairs),
        "max_abs": max(diffs),
        "mean_abs": statistics.mean(diffs),
        "max_rel": max(d / abs(b) for d, (_, b) in zip(diffs, pairs)),
    }


def weight_difference(a: Path, b: Path) -> dict:
    """Largest |a - b| relative to each tensor's largest |b|, over the weights of two exported folders."""
    import torch
    from safetensors.torch import load_file

    def load(folder):
        weights = {}
        for path in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(path))
        return weights

    wa, wb = load(a), load(b)
    same_names = wa.keys() == wb.keys()
    rel = max(
        float((wa[n].float() - wb[n].float()).abs().max() / wb[n].float().abs().max().clamp(min=1e-12))
        for n in wa
        if n in wb
    )
    return {
        "same_names": same_names,
        "max_rel": rel,
        "bitwise": same_names and all(torch.equal(wa[n], wb[n]) for n in wa),
    }


def export_check(fsdp: Path, reference: Path, data: Path, seq_len: int, cpu: bool) -> dict:
    """The FSDP run's final folder, loaded on one device: equal to its last sharded checkpoint's weights,
    and its held-out loss next to the one-GPU run's export."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from uptrain.data import TokenData

    device = "cuda:0" if torch.cuda.is_available() and not cpu else "cpu"
    last = max((fsdp / "checkpoints").glob("step-*"))
    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(last / "pytorch_model_fsdp_0", Path(scratch) / "model.pt")
        trained = {k.removeprefix("model."): v for k, v in torch.load(Path(scratch) / "model.pt")["model"].items()}
    result = {"checkpoint": last.name}
    losses = {}
    for name, folder in (("fsdp", fsdp / "final"), ("one", reference / "final")):
        if not folder.is_dir():
            continue
        model = (
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).to(device).eval()
        )
        if name == "fsdp":
            state = model.state_dict()
            result["names_match_checkpoint"] = state.keys() == trained.keys()
            result["max_abs_vs_checkpoint"] = max(float((state[n].cpu() - trained[n]).abs().max()) for n in state)
        total, count = 0.0, 0
        with torch.no_grad():
            for window in TokenData(data, "val").windows(seq_len, 8):
                ids = window[None].to(device)
                logits = model(ids).logits.float()
                total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
        losses[name] = total / count
        del model
    result["held_out_loss_float32"] = losses
    return result


def plot(results: dict, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    curves, differences = axes[0]
    for name in (
        "one",
        "ddp",
        "fsdp",
        "fsdp-resumed-fsdp",
        "fsdp-resumed-one",
        "distill-one",
        "distill-ddp",
        "distill-fsdp",
    ):
        if name in results:
            run = results[name]
            style = "--" if "resumed" in name else "-." if "distill" in name else "-"
            curves.plot(run["steps"], run["loss"], style, label=f"{name} ({run['processes']} GPU)", linewidth=1.2)
    curves.set(xlabel="optimizer step", ylabel="training cross-entropy (nats)", title="loss curves")
    curves.legend(fontsize=8)
    # each run minus its reference, step by step: the layouts against one GPU, the resumed runs against the
    # uninterrupted FSDP run they branch from
    for name, reference in (
        ("ddp", "one"),
        ("fsdp", "one"),
        ("fsdp-resumed-fsdp", "fsdp"),
        ("fsdp-resumed-one", "fsdp"),
        ("distill-ddp", "distill-one"),
        ("distill-fsdp", "distill-one"),
    ):
        if name in results and reference in results:
            ref = dict(zip(results[reference]["steps"], results[reference]["loss"]))
            steps = [s for s in results[name]["steps"] if s in ref]
            loss = dict(zip(results[name]["steps"], results[name]["loss"]))
            differences.plot(
                steps,
                [loss[s] - ref[s] for s in steps],
                "--" if "resumed" in name else "-",
                label=f"{name} - {reference}",
                linewidth=1.0,
            )
    differences.axhline(0, color="black", linewidth=0.5)
    differences.set(xlabel="optimizer step", ylabel="difference (nats)", title="difference from the reference run")
    differences.legend(fontsize=8)
    timed = [name for name in ("one", "ddp", "fsdp", "distill-one", "distill-ddp", "distill-fsdp") if name in results]
    rates = [results[n]["tokens_per_s_median"] or 0 for n in timed]
    axes[1][0].bar(timed, rates)
    axes[1][0].set_ylabel("tokens/s, all GPUs (median)")
    axes[1][0].set_title("throughput")
    memory = [results[n]["peak_memory_gib_per_gpu"] or 0 for n in timed]
    axes[1][1].bar(timed, memory)
    axes[1][1].set_ylabel("peak memory allocated per GPU (GiB)")
    axes[1][1].set_title("memory")
    for axis in axes[1]:
        axis.tick_params(axis="x", labelrotation=30)
    figure.suptitle(f"{summary['setup']['gpus']} GPUs vs 1, {summary['setup']['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path, help="a source's config.json and tokenizer (random weights are made)")
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--distill-steps", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument(
        "--runs", default="one,ddp,fsdp,resume,distill", help=f"comma-separated, of {', '.join(GROUPS)}"
    )
    parser.add_argument("--data", type=Path, help="a prepared token folder (default: docstrings, prepared here)")
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides key=value for every run")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo), to check the script without GPUs")
    args = parser.parse_args()
    unknown = set(args.runs.split(",")) - set(GROUPS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    if args.global_batch_size % (args.micro_batch_size * args.gpus):
        parser.error("--global-batch-size must be a multiple of --micro-batch-size x --gpus")
    if not args.cpu:
        import torch

        if torch.cuda.device_count() < args.gpus:
            parser.error(f"{args.gpus} GPUs asked for, {torch.cuda.device_count()} visible (use --cpu to check on CPU)")
    work, out_dir = args.work_dir, args.out_dir
    work.mkdir(parents=True, exist_ok=True)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    source = random_source(args.config_dir, work / "source")
    data = args.data or installed_docstring_tokens(work / "tokens", source)
    resume_at = args.steps // 2
    base = {
        "source": source,
        "data": data,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "max_steps": args.steps,
        "warmup_steps": 5,
        "lr": 1e-3,
        "eval_every": resume_at,
        "eval_windows": 8,
        "save_every": resume_at,
        "keep_checkpoints": 2,
        "log_every": 1,
        "tracker": "none",
        "compile_tuning": "false",
    }  # short runs: tuning's compilation costs more than it saves
    base.update(dict(item.split("=", 1) for item in args.set))
    distill = {
        **base,
        "max_steps": args.distill_steps,
        "eval_every": args.distill_steps,
        "save_every": args.distill_steps,
        "distill.enabled": "true",
    }  # teacher: the source

    wanted = [name for group in args.runs.split(",") for name in GROUPS[group]]
    for name in wanted:
        layout = name.rsplit("-", 1)[-1]  # one, ddp or fsdp
        processes = 1 if layout == "one" else args.gpus
        if name.startswith("fsdp-resumed"):
            if not (work / "fsdp" / "checkpoints" / f"step-{resume_at:08d}").is_dir():
                raise SystemExit(f"{name} needs the fsdp run's step-{resume_at} checkpoint: run --runs fsdp first")
            train(name, layout, processes, base, args, work, out_dir, resume_from=work / "fsdp", resumed_at=resume_at)
        else:
            train(name, layout, processes, distill if name.startswith("distill") else base, args, work, out_dir)

    # the comparison, from every run measured so far in OUT_DIR
    results = {path.stem: json.loads(path.read_text()) for path in sorted((out_dir / "runs").glob("*.json"))}
    import torch

    summary = {
        "setup": {
            "gpus": args.gpus,
            "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "recipe": str(RECIPE.relative_to(REPO)),
            "overrides": {**base},
            "distill_steps": args.distill_steps,
            "resume_at": resume_at,
        },
        "runs": {
            name: {k: v for k, v in run.items() if k not in ("steps", "loss", "lr")} for name, run in results.items()
        },
        "curves_vs_one_gpu": {},
        "resume": {},
        "export": None,
    }
    summary["setup"]["overrides"] = {k: str(v) for k, v in summary["setup"]["overrides"].items()}
    for name, reference in (
        ("ddp", "one"),
        ("fsdp", "one"),
        ("distill-ddp", "distill-one"),
        ("distill-fsdp", "distill-one"),
    ):
        if name in results and reference in results:
            summary["curves_vs_one_gpu"][name] = curve_difference(results[name], results[reference])
            summary["curves_vs_one_gpu"][name]["lr_equal"] = results[name]["lr"] == results[reference]["lr"]
            summary["curves_vs_one_gpu"][name]["weights"] = weight_difference(
                work / name / "final", work / reference / "final"
            )
    for name in ("fsdp-resumed-fsdp", "fsdp-resumed-one"):
        if name in results and "fsdp" in results:
            summary["resume"][name] = {
                **curve_difference(results[name], results["fsdp"], after=resume_at),
                "weights": weight_difference(work / name / "final", work / "fsdp" / "final"),
            }
    if (work / "fsdp" / "final").is_dir():
        from uptrain.recipe import load_recipe

        seq_len = load_recipe(RECIPE, [f"{k}={v}" for k, v in base.items()]).seq_len
        summary["export"] = export_check(work / "fsdp", work / "one", data, seq_len, args.cpu)
    (out_dir / "multi-gpu.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, summary, out_dir / "multi-gpu.png")
    print(json.dumps({k: summary[k] for k in ("curves_vs_one_gpu", "resume", "export")}, indent=1))
    for name, run in summary["runs"].items():
        print(
            f"{name:>18}: {run['processes']} proc, {run['tokens_per_s_median'] or 0:,.0f} tok/s "
            f"({run['tokens_per_s_per_gpu'] or 0:,.0f} per GPU), peak {run['peak_memory_gib_per_gpu']} GiB/GPU, "
            f"{run['wall_seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()
