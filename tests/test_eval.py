"""`uptrain eval`: the same windows for model and baseline, checked against a direct float64 computation."""

import copy
import json
import math
from pathlib import Path

import torch
from families import tiny_tokenizer

from uptrain.evaluate import score, text_windows

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def test_eval_identity_conversion_equals_its_baseline(tiny_source, run_cli, tmp_path):
    source, _ = tiny_source("llama")
    identity = tmp_path / "identity"
    assert run_cli("convert", source, identity, "--block-length", 1, "--block-layers", 4).exit_code == 0
    report = tmp_path / "eval.json"
    result = run_cli("eval", identity, "--data", SAMPLE, "--baseline", source, "--seq-len", 64, "--output", report)
    assert result.exit_code == 0, result.output
    results = json.loads(report.read_text())
    model, baseline = results["model"], results["baseline"]
    assert model["tokens"] == baseline["tokens"] > 0 and model["bytes"] == baseline["bytes"]
    assert math.isclose(model["loss"], baseline["loss"], rel_tol=1e-5)
    assert "| loss | perplexity | bits/byte |" in result.stdout


def test_score_against_float64(tiny_source):
    _, source = tiny_source("qwen2")
    tokenizer = tiny_tokenizer()
    windows = text_windows(tokenizer, SAMPLE.read_text().split("\n\n"), 32, 5)
    got = score(source, tokenizer, windows, batch_size=2)
    nats, count, size = 0.0, 0, 0
    model = copy.deepcopy(source).double()
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0]
            nats += torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += 31
            size += len(tokenizer.decode(window[1:]).encode())
    assert got["tokens"] == count == 5 * 31 and got["bytes"] == size
    assert math.isclose(got["loss"], nats / count, rel_tol=1e-5)
    assert math.isclose(got["bits_per_byte"], nats / math.log(2) / size, rel_tol=1e-5)


def test_eval_errors(tiny_source, run_cli, tmp_path):
    source, _ = tiny_source("llama")
    result = run_cli("eval", source, "--data", tmp_path / "missing.txt")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith(f"evaluation data not found: {tmp_path / 'missing.txt'}")
    short = tmp_path / "short.txt"
    short.write_text("hi")
    result = run_cli("eval", source, "--data", short, "--seq-len", 64)
    assert result.exit_code == 1 and "fewer than one window of 64" in result.stderr
