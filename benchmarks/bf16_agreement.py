"""How much of a bf16 greedy decode differs from float32, for each generation engine, and whether each divergence
starts at a near-tie: the noise floor that a fast-vs-eager bf16 comparison has to be read against.

    uptrain convert default /tmp/smol-id --block-length 1 --block-layers 30   # the identity: the source's function
    python benchmarks/bf16_agreement.py /tmp/smol-id [--new-tokens 96] [--device cpu] [--out FILE.json]
        [--runs float32/eager,float32/fast,bfloat16/eager,bfloat16/fast,bfloat16/compiled]

The identity conversion needs `--block-layers` = all of the source's layers (contract 4, docs/concepts.md): with
L_B 1 and the default half/half split, the token decoder sees only the prefix vectors and greedy output loops at
once.

Greedy tokens of eight prompts (left-padded) from the eager and fast engines (and the compiled one, the fast
engine with `compile_steps`, where --runs names it) in float32 and bfloat16. For each,
the share of tokens equal to float32 eager's, the first diverging token of each row, and there the float32
logit gap between the token float32 chose and the one the other run chose (the same prefix, teacher-forced
in float32): a gap of a few hundredths of a nat is a near-tie that bf16 rounding can flip, a large gap
would be an engine error. Also the fast (and compiled) engine against the eager one in the same dtype, with the
float32 gap at their first divergence along the eager row, and how often the float32 top-2 gap along the
reference rows is that small anyway.

The verdict (printed, in the report, and the exit status): every float32 run identical to float32 eager, and
every bf16 first divergence (from float32 eager, and of the fast and compiled engines from bf16 eager) at a
float32 gap within --near-tie nats. The default, 0.5, is two bf16 spacings at logits of 16-32, where these
models' top logits lie. A row that loops leaves float32 by nats in bf16 whichever engine runs it, so the
verdict means something only on text that does not loop: run it on the identity conversion.

--tokens FILE.partial.json analyses tokens generated elsewhere (a GPU's runs, analysed on a CPU): the
teacher-forced passes need no GPU, and they would add to the eager bf16 decode of 2,048 tokens there.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from uptrain.inference import load_for_inference

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The capital of France is",
    "Photosynthesis is the process by which",
    "import numpy as np\n",
    "Dear Sir or Madam,\nI am writing to",
    "The three laws of thermodynamics",
]
NEAR_TIE = (0.01, 0.05, 0.1)  # nats: float32 top-2 gaps counted along the reference rows
VERDICT_NEAR_TIE = 0.5  # nats: the largest float32 gap at which a bf16 first divergence still counts as a near-tie
DEFAULT_RUNS = "float32/eager,float32/fast,bfloat16/eager,bfloat16/fast"
ENGINE_OPTIONS = {
    "eager": {"engine": "eager"},
    "fast": {"engine": "fast"},
    "compiled": {"engine": "fast", "compile_steps": True},
}


def first_divergences(tokens: torch.Tensor, reference: torch.Tensor) -> list[int | None]:
    """Index of the first differing token of each row (None where the rows are equal); (rows, new) tensors."""
    return [next(iter((tokens[r] != reference[r]).nonzero().flatten().tolist()), None) for r in range(len(tokens))]


@torch.no_grad()
def row_logits(model, prompt: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """(new, vocab) float32 logits predicting each continuation token, teacher-forced after the unpadded prompt."""
    sequence = torch.cat([prompt, continuation])[None]
    logits = model(input_ids=sequence).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(continuation)]


def generate_runs(args, runs) -> tuple[dict, dict]:
    """{(dtype, engine): (rows, new_tokens) tokens}, {"dtype engine": seconds}; after each run the tokens so far
    go to OUT.partial.json, so that a run cut off by a time limit keeps them."""
    tokens, seconds = {}, {}
    for dtype in dict.fromkeys(d for d, _ in runs):
        model, tokenizer = load_for_inference(args.model, args.device, dtype)
        batch = left_padded_prompts(tokenizer, args.device)
        for engine in [e for d, e in runs if d == dtype]:
            started = time.perf_counter()
            out = model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                **ENGINE_OPTIONS[engine],
            )
            tokens[(dtype, engine)] = out[:, batch["input_ids"].shape[1] :].cpu()
            seconds[f"{dtype} {engine}"] = round(time.perf_counter() - started, 1)
            model.release_generation_engine()
            print(f"{dtype} {engine}: {seconds[f'{dtype} {engine}']} s", flush=True)
            if args.out:
                partial = {f"{d} {e}": t.tolist() for (d, e), t in tokens.items()}
                args.out.with_suffix(".partial.json").write_text(json.dumps({"seconds": seconds, "tokens": partial}))
        del model
    return tokens, seconds


def left_padded_prompts(tokenizer, device: str):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)


def gaps_at(logits: list[torch.Tensor], chosen: torch.Tensor, other: torch.Tensor, first: list) -> list[float | None]:
    """Per row, at its first divergence k: logit of `chosen`'s token minus logit of `other`'s, in `logits`."""
    return [
        None if k is None else float(logits[r][k, chosen[r, k]] - logits[r][k, other[r, k]])
        for r, k in enumerate(first)
    ]


def verdict(report: dict, near_tie: float) -> dict:
    """{"passed", "near_tie", "failures"} of a report: float32 runs must equal float32 eager token for token;
    each bf16 first divergence must sit at a float32 gap of at most `near_tie` nats (either sign: along the
    eager row the other engine's token may be float32's favourite)."""
    comparisons = [
        (f"{run} against float32 eager", run.split()[0], result)
        for run, result in report["against_float32_eager"].items()
    ]
    comparisons += [
        (f"{engine} against eager, {dtype}", dtype, result)
        for engine in ("fast", "compiled")
        for dtype, result in report[f"{engine}_against_eager"].items()
    ]
    failures = []
    for name, dtype, result in comparisons:
        rows = [
            (r, k, g)
            for r, (k, g) in enumerate(zip(result["first_divergence"], result["float32_gap_at_first_divergence"]))
            if k is not None
        ]
        if dtype == "float32":
            failures += [f"{name}: row {r} differs from token {k} on" for r, k, _ in rows]
        else:
            failures += [
                f"{name}: row {r} parts at token {k} with a float32 gap of {g:.3f} nats"
                for r, k, g in rows
                if abs(g) > near_tie
            ]
    return {"passed": not failures, "near_tie": near_tie, "failures": failures}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", type=Path, help="write the figures here as JSON (and the tokens, after each run, to OUT.partial.json)"
    )
    parser.add_argument(
        "--runs",
        default=DEFAULT_RUNS,
        help=f"DTYPE/ENGINE pairs (engines: {', '.join(ENGINE_OPTIONS)}); float32/eager is the reference",
    )
    parser.add_argument("--tokens", type=Path, help="analyse the tokens of an OUT.partial.json instead of generating")
    parser.add_argument(
        "--near-tie",
        type=float,
        default=VERDICT_NEAR_TIE,
        help="nats: the verdict's largest float32 gap at a bf16 first divergence",
    )
    args = parser.parse_args()
    if args.tokens:
        saved = json.loads(args.tokens.read_text())
        tokens = {tuple(key.split()): torch.tensor(value) for key, value in saved["tokens"].items()}
        seconds, args.new_tokens = saved["seconds"], next(iter(tokens.values())).shape[1]
    else:
        runs = [tuple(run.split("/")) for run in args.runs.split(",")]
        if ("float32", "eager") not in runs or any(engine not in ENGINE_OPTIONS for _, engine in runs):
            parser.error(f"--runs must include float32/eager, engines from {', '.join(ENGINE_OPTIONS)}")
        tokens, seconds = generate_runs(args, runs)
    model, tokenizer = load_for_inference(args.model, args.device, "float32")
    batch = left_padded_prompts(tokenizer, args.device)
    prompts = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    def teacher_forced(rows: torch.Tensor) -> list[torch.Tensor]:  # float32 logits along each row: (new, vocab)
        return [row_logits(model, prompts[r], rows[r].to(args.device)).cpu() for r in range(len(PROMPTS))]

    reference = tokens[("float32", "eager")]
    logits = teacher_forced(reference)
    top2 = torch.cat([row.topk(2, dim=-1).values for row in logits])  # (rows x new, 2)
    gaps = top2[:, 0] - top2[:, 1]
    report = {
        "model": args.model,
        "device": args.device,
        "new_tokens": args.new_tokens,
        "prompts": len(PROMPTS),
        "tokens_from": str(args.tokens) if args.tokens else None,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "teacher_forced_argmax_equals_float32_eager": float(
            (torch.stack([row.argmax(-1) for row in logits]) == reference).float().mean()
        ),
        "float32_top2_gap_below": {str(t): float((gaps < t).float().mean()) for t in NEAR_TIE},
        "seconds": seconds,
        "against_float32_eager": {},
        "fast_against_eager": {},
        "compiled_against_eager": {},
    }
    for (dtype, engine), value in tokens.items():
        first = first_divergences(value, reference)
        report["against_float32_eager"][f"{dtype} {engine}"] = {
            "token_agreement": float((value == reference).float().mean()),
            "first_divergence": first,
            "float32_gap_at_first_divergence": gaps_at(logits, reference, value, first),
        }
    for dtype in ("float32", "bfloat16"):
        if (dtype, "eager") not in tokens:
            continue
        eager = tokens[(dtype, "eager")]
        eager_logits = logits if dtype == "float32" else teacher_forced(eager)
        for engine in ("fast", "compiled"):
            if (dtype, engine) in tokens:
                other = tokens[(dtype, engine)]
                first = first_divergences(other, eager)
                report[f"{engine}_against_eager"][dtype] = {
                    "token_agreement": float((other == eager).float().mean()),
                    "first_divergence": first,
                    # along the eager row: float32 logit of eager's token minus that of this engine's token
                    "float32_gap_at_first_divergence": gaps_at(eager_logits, eager, other, first),
                }
    report["verdict"] = verdict(report, args.near_tie)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"passed: {report['verdict']['passed']}")
    sys.exit(0 if report["verdict"]["passed"] else 1)


if __name__ == "__main__":
    main()
