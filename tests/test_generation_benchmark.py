"""benchmarks/generation_fast.py's arithmetic: the roofline against a closed form (a vanilla decode at a huge
batch is bound by reading the KV cache, so its time per row is the sum over steps of cache bytes over
bandwidth), the merging of part files; and the token-agreement logic of both GPU checks (generation_fast's
and bf16_agreement's, with the latter's verdict). The scripts are imported as the tools they are."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def tool(name: str):
    """benchmarks/NAME.py as a module (the folder is not a package: its scripts run as files)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bf16_agreement, generation_fast = tool("bf16_agreement"), tool("generation_fast")
first_divergences, gaps_at, verdict = bf16_agreement.first_divergences, bf16_agreement.gaps_at, bf16_agreement.verdict
CARDS, SHAPES, compare = generation_fast.CARDS, generation_fast.SHAPES, generation_fast.compare
render, roofline = generation_fast.render, generation_fast.roofline


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
        assert roofline(config, "block", prompt, new, 4096, "H100") > 4 * roofline(
            config, "vanilla", prompt, new, 4096, "H100"
        )
    assert roofline(config, "block", 128, 2048, 4096, "unknown card") is None


def test_render_merges_one_engines_rows_from_several_calls_by_batch(tmp_path):
    def row(batch, tokens_per_second):
        return {
            "batch_size": batch,
            "tokens_per_second": tokens_per_second,
            "ms_per_token": 1.0,
            "peak_memory_bytes": 2**30,
            "all_seconds": [1.0],
        }

    def part(name, rows):
        (tmp_path / name).write_text(
            json.dumps(
                {
                    "shape": "SmolLM2-360M",
                    "config": SHAPES["SmolLM2-360M"],
                    "environment": {"gpu": "NVIDIA H100 80GB HBM3"},
                    "scenario": "decode-heavy",
                    "prompt_len": 128,
                    "gen_len": 2048,
                    "results": {"vanilla fast": rows},
                }
            )
        )

    part("a-vanilla-fast.json", [row(256, 100.0), row(512, 150.0)])
    part("b-vanilla-fast-768.json", [row(768, 170.0), row(512, 160.0)])  # a later run: 768, and 512 again
    summary = render(tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["shapes"]["SmolLM2-360M"]["scenarios"]["decode-heavy"][
        "results"
    ]
    assert [(r["batch_size"], r["tokens_per_second"]) for r in rows["vanilla fast"]] == [
        (256, 100.0),
        (512, 160.0),
        (768, 170.0),
    ]
    assert "| vanilla fast | 768 | 170 |" in summary


def test_agreement_counts_tokens_and_finds_each_rows_first_divergence():
    reference = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])  # (rows, new tokens)
    other = torch.tensor([[5, 6, 0, 0], [1, 2, 3, 4], [0, 9, 9, 9]])
    assert first_divergences(other, reference) == [2, None, 0]
    report = compare(other, reference)
    assert report == {"identical": False, "token_agreement": 9 / 12, "first_divergence": [2, None, 0]}
    assert compare(reference, reference)["identical"]


def test_gap_at_the_first_divergence_is_the_chosen_tokens_logit_minus_the_others():
    chosen, other = torch.tensor([[3, 1], [2, 2]]), torch.tensor([[3, 0], [2, 2]])
    logits = [torch.zeros(2, 4), torch.zeros(2, 4)]  # per row: (new tokens, vocab)
    logits[0][1, 1], logits[0][1, 0] = 2.5, 2.25  # row 0 parts at token 1: a 0.25 near-tie
    assert gaps_at(logits, chosen, other, first_divergences(other, chosen)) == [0.25, None]


def _agreement_report(float32_fast_first, bf16_gaps, compiled_gaps):
    """A bf16_agreement report with one float32 and one bf16 run against float32 eager, and compiled against eager."""

    def result(gaps):
        return {"first_divergence": [None if g is None else 7 for g in gaps], "float32_gap_at_first_divergence": gaps}

    fast32 = {
        "first_divergence": float32_fast_first,
        "float32_gap_at_first_divergence": [None] * len(float32_fast_first),
    }
    return {
        "against_float32_eager": {"float32 fast": fast32, "bfloat16 fast": result(bf16_gaps)},
        "fast_against_eager": {},
        "compiled_against_eager": {"bfloat16": result(compiled_gaps)},
    }


def test_verdict_passes_near_ties_and_fails_float32_differences_and_large_bf16_gaps():
    assert verdict(_agreement_report([None, None], [0.2, None], [-0.4, 0.01]), near_tie=0.5) == {
        "passed": True,
        "near_tie": 0.5,
        "failures": [],
    }
    large = verdict(
        _agreement_report([None, None], [0.2, None], [-0.6, 0.01]), near_tie=0.5
    )  # the sign does not excuse
    assert not large["passed"] and large["failures"] == [
        "compiled against eager, bfloat16: row 0 parts at token 7 with a float32 gap of -0.600 nats"
    ]
    float32 = verdict(_agreement_report([None, 3], [None, None], [None, None]), near_tie=0.5)
    assert float32["failures"] == ["float32 fast against float32 eager: row 1 differs from token 3 on"]
