"""Where a training run's NaN comes from: per-step loss and gradient norm under several objective settings,
and the first step's sequences that have non-finite gradients on their own.

Found the vanilla NaN of docs/training-throughput.md ("The vanilla NaN"): the same first-step NaN gradient
norm under every setting, down to one sequence starting with the end-of-text token, whose embedding row was
zero. On the GPU machine, with the throughput benchmark's source and data:

    python benchmarks/gradient_probe.py cfg work --data tokens --output probe.json \\
        --settings states+loss,plain-eager,stacks+loss,states-only --steps 8 --bisect

Settings (vanilla, the throughput benchmark's recipe, micro-batch 32 x 8 unless overridden):
- states+loss: the recipe's path (states compiled as one graph, chunk loss compiled);
- stacks+loss: the decoder stack compiled, the chunk loss compiled, the rest eager;
- states-only: the states compiled, the chunk loss eager;
- plain-eager: full logits, nothing compiled, micro-batch 16.
Steps are the trainer's own (`Trainer.train_step`, which updates only when loss and gradient norm are finite),
so every step's gradient norm is printed even when it is not finite; nothing stops the probe.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SETTINGS = {  # name -> (NextTokenObjective flags forced, recipe overrides)
    "states+loss": (dict(compile_states=True, compile_loss=True), {}),
    "stacks+loss": (dict(compile_states=False, compile_loss=True), {}),
    "states-only": (dict(compile_states=True, compile_loss=False), {}),
    "plain-eager": ({}, dict(fast_loss=False, compile=False, micro_batch_size=16)),
}


def trainer_for(name: str, source: Path, data: Path, work: Path, steps: int, extra: list[str]):
    import uptrain.train as train_module
    from training_throughput import RECIPE
    from uptrain.objective import NextTokenObjective
    from uptrain.recipe import load_recipe

    forced, overrides = SETTINGS[name]

    class Objective(NextTokenObjective):
        def __init__(self, model, **kwargs):
            super().__init__(model, **{**kwargs, **forced})

    train_module.NextTokenObjective = Objective
    torch._dynamo.reset()
    values = dict(source=source, data=data, output_dir=work / f"probe-{name}", tracker="none", architecture="vanilla",
                  fast_loss=True, compile=True, micro_batch_size=32, global_batch_size=256, max_steps=steps,
                  warmup_steps=2, compile_tuning=False)
    values.update(overrides)
    trainer = train_module.Trainer(load_recipe(RECIPE, [f"{k}={v}" for k, v in values.items()] + extra))
    trainer.load()
    trainer.model.train()
    return trainer


def non_finite_gradients(model, ids) -> list[str]:
    """Parameters whose gradient is not finite after transformers' own loss on `ids` (B, T), bf16 autocast."""
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    bad = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    model.zero_grad()
    return bad


def bisect(trainer) -> dict:
    """The first micro-batch of step 0 with non-finite gradients on its own, and which of its rows have them."""
    model = trainer.accelerator.unwrap_model(trainer.model).model
    for index, ids in enumerate(trainer.micro_batches(0)):
        if non_finite_gradients(model, ids):
            rows = [r for r in range(ids.shape[0]) if non_finite_gradients(model, ids[r : r + 1])]
            return {"micro_batch": index, "rows": rows, "first_tokens": [int(ids[r, 0]) for r in rows]}
    return {"micro_batch": None}


def probe(trainer, steps: int) -> list[dict]:
    """The trainer's own steps: each updates only when loss and gradient norm are finite, and records both."""
    records, began = [], time.time()
    for step in range(steps):
        mean = trainer.train_step(step)
        records.append({"step": step, "mean_ce": mean, "grad_norm": trainer.grad_norm})
        print(f"step {step}: ce {mean:.4f}, gradient norm {trainer.grad_norm:.3f} ({time.time() - began:.0f} s)", flush=True)
    return records


def main():
    from training_throughput import setup

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_dir", type=Path, help="Config and tokenizer folder of the source's shape.")
    parser.add_argument("work_dir", type=Path, help="Where the random source and the runs go.")
    parser.add_argument("--data", type=Path, help="A prepared token folder (default: docstrings, built once).")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"Comma-separated, of {sorted(SETTINGS)}.")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bisect", action="store_true", help="Also find step 0's sequences with NaN gradients.")
    parser.add_argument("--set", nargs="*", default=[], help="Extra recipe overrides key=value (e.g. seq_len=64).")
    args = parser.parse_args()
    source, _, data = setup(args.config_dir, args.work_dir, args.data)
    results = {}
    for name in args.settings.split(","):
        trainer = trainer_for(name, source, data, args.work_dir, args.steps, args.set)
        print(f"-- {name}", flush=True)
        results[name] = {"steps": probe(trainer, args.steps)}
        if args.bisect and name == "plain-eager":
            results[name]["bisect"] = bisect(trainer)
            print(f"bisect: {results[name]['bisect']}", flush=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
