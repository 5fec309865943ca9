"""Peak resident memory of `uptrain convert` on a random-weight Llama of over 1 GB on disk.

Writes docs/results/conversion-memory/report.md (the results page: docs/results/conversion-memory.md).
Target: peak RSS under 1.5 x model size + 1 GiB.
Usage: python benchmarks/convert_memory.py [--workdir DIR]
"""

import argparse
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def build_source(folder: Path) -> int:
    """A ~0.6B-parameter bfloat16 Llama (about 1.2 GB of safetensors); returns its size on disk in bytes."""
    config = LlamaConfig(
        hidden_size=1536, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="uptrain-mem-"))
    source = workdir / "source"
    size = build_source(source)
    out = workdir / "converted"
    shutil.rmtree(out, ignore_errors=True)

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "uptrain", "convert", str(source), str(out)], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    limit = 1.5 * size + GIB
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    verdict = "within" if peak <= limit else "OVER"
    report = f"""# Conversion memory

Measured by `python benchmarks/convert_memory.py` on {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU,
torch {torch.__version__}, Python {platform.python_version()}.

| | |
|---|---|
| source | random-weight Llama, 18 layers, D=1536, bfloat16 |
| source size on disk | {size / GIB:.2f} GiB |
| converted size on disk | {written / GIB:.2f} GiB |
| peak resident memory of `uptrain convert` | {peak / GIB:.2f} GiB |
| target: 1.5 x source size + 1 GiB | {limit / GIB:.2f} GiB ({verdict} the target) |
| wall time | {seconds:.0f} s |

The source is read by transformers from its safetensors file, the target is built on the meta device
(names and shapes only), and target tensors are written in shards of at most 500 MB as they are produced.
"""
    (REPO / "docs" / "results" / "conversion-memory" / "report.md").write_text(report)
    print(report)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
