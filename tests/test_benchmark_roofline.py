"""The generation roofline of benchmarks/generation_fast.py against a closed form: a vanilla decode at a huge
batch is bound by reading the KV cache, so its time per row is the sum over steps of cache bytes over bandwidth."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from generation_fast import CARDS, SHAPES, roofline  # noqa: E402


def test_vanilla_decode_at_huge_batch_is_the_kv_cache_bandwidth_bound():
    config, (prompt, new) = SHAPES["SmolLM2-135M"], (128, 2048)
    _, bandwidth = CARDS["H100"]
    # K and V, 3 KV heads x 64, 30 layers, bf16: 23,040 bytes per cached position
    kv_bytes = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * 2
    positions_read = sum(prompt + step for step in range(new))  # per row, over the decoding steps
    expected = new / (kv_bytes * positions_read / bandwidth)
    assert roofline(config, "vanilla", prompt, new, 2**22, "H100") == pytest.approx(expected, rel=0.01)


def test_block_bound_exceeds_vanilla_and_unknown_cards_have_none():
    config = SHAPES["SmolLM2-360M"]
    for prompt, new in ((128, 2048), (2048, 128)):
        assert roofline(config, "block", prompt, new, 4096, "H100") > 4 * roofline(config, "vanilla", prompt, new, 4096, "H100")
    assert roofline(config, "block", 128, 2048, 4096, "unknown card") is None
