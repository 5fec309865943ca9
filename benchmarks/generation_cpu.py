"""Generation throughput on the CPU: SmolLM2-135M-Instruct vanilla vs converted (15/15, L_B 4, r 2).

Prompt 128 tokens, 128 new tokens, greedy, float32, batch 1 and 16; one warm-up, then the median of
`--repeats` timed runs. Weights do not change the speed: the converted model is a fresh conversion.
Writes docs/generation-cpu.md. Usage: python benchmarks/generation_cpu.py [--repeats 3]
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from uptrain.convert import ConvertOptions, convert
from uptrain.default_model import default_model_path
from uptrain.sources import load_model, load_tokenizer, resolve

REPO = Path(__file__).resolve().parents[1]
PROMPT, NEW = 128, 128


def tokens_per_second(model, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    prompt = torch.randint(100, 40000, (batch, PROMPT))
    settings = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, **settings)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = model.generate(prompt, **settings)
        times.append(time.perf_counter() - start)
        assert output.shape == (batch, PROMPT + NEW)
    return batch * NEW / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source_ref = resolve(str(default_model_path()))
    vanilla = load_model(source_ref).eval()
    with tempfile.TemporaryDirectory() as work:
        vanilla.save_pretrained(Path(work) / "src")
        load_tokenizer(source_ref).save_pretrained(Path(work) / "src")
        out = convert(str(Path(work) / "src"), Path(work) / "b4", ConvertOptions())
        block = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    rows = []
    for batch in (1, 16):
        v = tokens_per_second(vanilla, batch, args.repeats)
        b = tokens_per_second(block, batch, args.repeats)
        rows.append(f"| {batch} | {v:,.1f} | {b:,.1f} | {b / v:.2f}x |")
        print(rows[-1], flush=True)
    report = f"""# Generation speed on the CPU (first figure)

Measured by `python benchmarks/generation_cpu.py --repeats {args.repeats}` on {time.strftime('%Y-%m-%d')}:
{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, greedy.
SmolLM2-135M-Instruct through transformers' own `generate` (dynamic KV cache) against its Block
Transformer conversion (15/15 layers, L_B 4, r 2) through this toolkit's `generate`. Prompt {PROMPT}
tokens, {NEW} new tokens; generated tokens per second, median of {args.repeats} runs after one warm-up.

| batch | vanilla tok/s | block tok/s | speed-up |
|---|---|---|---|
{chr(10).join(rows)}

Both loops run in eager PyTorch with per-step Python overhead; the GPU engine (static caches, CUDA
graphs) is later work, and the paper's speed-ups are GPU figures at large batch.
"""
    (REPO / "docs" / "generation-cpu.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
