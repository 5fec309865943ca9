"""How much of a bf16 greedy decode differs from float32, for each generation engine: the noise floor that a
fast-vs-eager bf16 comparison has to be read against.

    uptrain convert default /tmp/smol-b1 --block-length 1     # the identity conversion: real, peaked logits
    python benchmarks/bf16_agreement.py /tmp/smol-b1 [--new-tokens 96] [--device cpu]

Greedy tokens of four prompts (left-padded) from the eager and fast engines in float32 and bfloat16; prints
each one's agreement with float32 eager and the first diverging token of each row.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uptrain.inference import load_for_inference  # noqa: E402

PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "The capital of France is"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tokens = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_for_inference(args.model, args.device, dtype)
        tokenizer.padding_side = "left"
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(args.device)
        for engine in ("eager", "fast"):
            out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, engine=engine)
            tokens[(dtype, engine)] = out[:, batch["input_ids"].shape[1]:].cpu()  # (rows, new_tokens)
    reference = tokens[("float32", "eager")]
    for (dtype, engine), value in tokens.items():
        first = [next(iter((value[r] != reference[r]).nonzero().flatten().tolist()), None) for r in range(len(PROMPTS))]
        agreement = (value == reference).float().mean().item()
        print(f"{dtype:8} {engine:5}: {agreement:.3f} of tokens equal to float32 eager; first divergence per row {first}")


if __name__ == "__main__":
    main()
