"""How much of a bf16 greedy decode differs from float32, for each generation engine, and whether each divergence
starts at a near-tie: the noise floor that a fast-vs-eager bf16 comparison has to be read against.

    uptrain convert default /tmp/smol-b1 --block-length 1     # the identity conversion: real, peaked logits
    python benchmarks/bf16_agreement.py /tmp/smol-b1 [--new-tokens 96] [--device cpu] [--out FILE.json]

Greedy tokens of eight prompts (left-padded) from the eager and fast engines in float32 and bfloat16. For each,
the share of tokens equal to float32 eager's, the first diverging token of each row, and there the float32
logit gap between the token float32 chose and the one the other run chose (the same prefix, teacher-forced
in float32): a gap of a few hundredths of a nat is a near-tie that bf16 rounding can flip, a large gap
would be an engine error. Also the fast engine against the eager one in the same dtype, and how often the
float32 top-2 gap along the reference rows is that small anyway.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uptrain.inference import load_for_inference  # noqa: E402

PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "The capital of France is", "Photosynthesis is the process by which", "import numpy as np\n",
           "Dear Sir or Madam,\nI am writing to", "The three laws of thermodynamics"]
NEAR_TIE = (0.01, 0.05, 0.1)  # nats: float32 top-2 gaps counted along the reference rows


def first_divergences(tokens: torch.Tensor, reference: torch.Tensor) -> list[int | None]:
    """Index of the first differing token of each row (None where the rows are equal); (rows, new) tensors."""
    return [next(iter((tokens[r] != reference[r]).nonzero().flatten().tolist()), None) for r in range(len(tokens))]


@torch.no_grad()
def row_logits(model, prompt: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """(new, vocab) float32 logits predicting each continuation token, teacher-forced after the unpadded prompt."""
    sequence = torch.cat([prompt, continuation])[None]
    logits = model(input_ids=sequence).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(continuation)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    tokens, prompts = {}, None
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_for_inference(args.model, args.device, dtype)
        tokenizer.padding_side = "left"
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(args.device)
        for engine in ("eager", "fast"):
            out = model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, engine=engine)
            tokens[(dtype, engine)] = out[:, batch["input_ids"].shape[1]:].cpu()  # (rows, new_tokens)
        if dtype == "float32":
            reference_model = model
            prompts = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    reference = tokens[("float32", "eager")]
    logits = [row_logits(reference_model, prompts[r], reference[r].to(args.device)).cpu() for r in range(len(PROMPTS))]
    top2 = torch.cat([row.topk(2, dim=-1).values for row in logits])  # (rows x new, 2)
    gaps = top2[:, 0] - top2[:, 1]
    report = {
        "model": args.model, "device": args.device, "new_tokens": args.new_tokens, "prompts": len(PROMPTS),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "torch": torch.__version__,
        "teacher_forced_argmax_equals_float32_eager": float(
            (torch.stack([row.argmax(-1) for row in logits]) == reference).float().mean()),
        "float32_top2_gap_below": {str(t): float((gaps < t).float().mean()) for t in NEAR_TIE},
        "against_float32_eager": {}, "fast_against_eager": {},
    }
    for (dtype, engine), value in tokens.items():
        first = first_divergences(value, reference)
        # float32 logit of the reference token minus that of this run's token, at each row's first divergence
        gap_at = [None if k is None else float(logits[r][k, reference[r, k]] - logits[r][k, value[r, k]])
                  for r, k in enumerate(first)]
        report["against_float32_eager"][f"{dtype} {engine}"] = {
            "token_agreement": float((value == reference).float().mean()), "first_divergence": first,
            "float32_gap_at_first_divergence": gap_at}
    for dtype in ("float32", "bfloat16"):
        fast, eager = tokens[(dtype, "fast")], tokens[(dtype, "eager")]
        report["fast_against_eager"][dtype] = {"token_agreement": float((fast == eager).float().mean()),
                                               "first_divergence": first_divergences(fast, eager)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
