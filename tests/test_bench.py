"""`uptrain bench`: the report is consistent with its own timings, auto batch search stops before memory
runs short, and out-of-memory ends a search instead of the run. (The figures themselves live in docs/.)"""

import json
import math
import statistics
import time

import pytest
import torch

from uptrain.bench import BenchSettings, next_batch_size, predicted_seconds, sweep

GIB = 2**30


def test_bench_cli_reports_both_models_and_writes_json_and_plot(converted, tiny_source, run_cli, tmp_path):
    model, (source, _) = converted("llama"), tiny_source("llama")
    report_path = tmp_path / "bench.json"
    result = run_cli(
        "bench",
        model,
        "--baseline",
        source,
        "--device",
        "cpu",
        "--scenario",
        "custom",
        "--prompt-len",
        9,
        "--gen-len",
        11,
        "--batch-size",
        "1,3",
        "--repeats",
        3,
        "--output",
        report_path,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["settings"]["prompt_len"] == 9 and report["settings"]["gen_len"] == 11
    for key in ("model", "baseline"):
        results = report[key]["results"]
        assert [r["batch_size"] for r in results] == [1, 3]
        for r in results:
            assert len(r["all_seconds"]) == 3 and r["seconds"] == statistics.median(r["all_seconds"])
            assert r["tokens_per_second"] == pytest.approx(r["batch_size"] * 11 / r["seconds"])
            assert r["ms_per_token"] == pytest.approx(1000 * r["seconds"] / 11)
            assert r["peak_memory_bytes"] > 0
    ratio = report["speedup"]["at_same_batch_size"]
    assert ratio["1"] == pytest.approx(
        report["model"]["results"][0]["tokens_per_second"] / report["baseline"]["results"][0]["tokens_per_second"]
    )
    assert "speed-up at equal batch size" in result.stdout


def test_bench_engines_are_named_in_the_report(converted, tiny_source, run_cli, tmp_path):
    model, (source, _) = converted("llama"), tiny_source("llama")
    report_path = tmp_path / "engines.json"
    result = run_cli(
        "bench",
        model,
        "--baseline",
        source,
        "--device",
        "cpu",
        "--scenario",
        "custom",
        "--prompt-len",
        6,
        "--gen-len",
        5,
        "--batch-size",
        "2",
        "--repeats",
        1,
        "--engine",
        "eager",
        "--baseline-engine",
        "fast",
        "--output",
        report_path,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["model"]["engine"] == "eager" and report["baseline"]["engine"] == "fast"
    assert report["settings"]["engine"] == "eager" and report["settings"]["baseline_engine"] == "fast"
    assert f"model: {model} (eager engine)" in result.stdout and "(fast engine)" in result.stdout
    result = run_cli("bench", model, "--device", "cpu", "--engine", "turbo")
    assert result.exit_code == 1 and "unknown engine 'turbo'" in result.stderr
    result = run_cli("bench", model, "--device", "cpu", "--engine", "compiled")  # an option of the fast engine
    assert result.exit_code == 1 and "unknown engine 'compiled'" in result.stderr
    result = run_cli("bench", model, "--device", "cpu", "--engine", "eager", "--compile")
    assert result.exit_code == 1 and "--compile compiles the fast engine's steps" in result.stderr


def test_compile_puts_the_fast_engines_steps_through_torch_compile(
    converted, tiny_source, run_cli, tmp_path, monkeypatch
):
    """--compile reaches the fast engine (its steps compiled, here by aot_eager, which traces as inductor does
    without its minutes of code generation) and the report says which model ran compiled steps."""
    from torch._dynamo.utils import counters

    from uptrain.generation_block_transformer import StepGraphs

    monkeypatch.setattr(StepGraphs, "COMPILE_ARGUMENTS", {"backend": "aot_eager"})
    counters.clear()
    model, (source, _) = converted("llama"), tiny_source("llama")
    report_path = tmp_path / "compiled.json"
    result = run_cli(
        "bench",
        model,
        "--baseline",
        source,
        "--device",
        "cpu",
        "--scenario",
        "custom",
        "--prompt-len",
        5,
        "--gen-len",
        6,
        "--batch-size",
        "2",
        "--repeats",
        1,
        "--baseline-engine",
        "hf",
        "--compile",
        "--output",
        report_path,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert (
        report["settings"]["compile"] and report["model"]["compile_steps"] and not report["baseline"]["compile_steps"]
    )
    assert f"model: {model} (fast engine, compiled steps)" in result.stdout and "(hf engine)" in result.stdout
    assert counters["stats"]["unique_graphs"] >= 2  # the token block and a block step


def test_random_init_and_auto_search_up_to_the_limit(converted, run_cli, tmp_path):
    report_path = tmp_path / "auto.json"
    result = run_cli(
        "bench",
        converted("qwen2"),
        "--random-init",
        "--scenario",
        "custom",  # --device auto
        "--prompt-len",
        5,
        "--gen-len",
        6,
        "--max-batch-size",
        8,
        "--repeats",
        1,
        "--output",
        report_path,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["environment"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [r["batch_size"] for r in report["model"]["results"]] == [1, 4, 8]  # x4, then the largest that fits
    assert "baseline" not in report


def test_auto_search_predicts_memory_from_the_last_batch():
    # 1 GiB resident, 2 GiB peak at batch 4: a quarter GiB a row
    assert next_batch_size(2 * GIB, 4, 4, budget=10 * GIB, resident=GIB, max_size=10**6) == 16
    assert next_batch_size(2 * GIB, 4, 4, budget=4 * GIB, resident=GIB, max_size=10**6) == 8  # 12 rows fit
    assert next_batch_size(2 * GIB, 4, 4, budget=2.1 * GIB, resident=GIB, max_size=10**6) is None
    assert next_batch_size(2 * GIB, 4, 4, budget=10 * GIB, resident=GIB, max_size=8) == 8
    # no memory reading: only the cap limits the search
    assert next_batch_size(None, 4, 4, budget=float("inf"), resident=0, max_size=8) == 8
    assert next_batch_size(None, 8, 4, budget=float("inf"), resident=0, max_size=8) is None


def test_run_time_extrapolates_from_the_last_two_batches_between_square_root_and_linear():
    host_bound = [{"batch_size": 64, "seconds": 10.0}, {"batch_size": 256, "seconds": 10.5}]
    assert predicted_seconds(host_bound, 1024) == pytest.approx(21.0)  # exponent clamped up to 0.5
    full = [{"batch_size": 1024, "seconds": 10.0}, {"batch_size": 4096, "seconds": 80.0}]
    assert predicted_seconds(full, 8192) == pytest.approx(160.0)  # exponent clamped down to 1
    between = [{"batch_size": 100, "seconds": 4.0}, {"batch_size": 400, "seconds": 12.0}]
    exponent = math.log(3) / math.log(4)
    assert predicted_seconds(between, 1600) == pytest.approx(12.0 * 4**exponent)
    assert predicted_seconds(between[:1] + [{"batch_size": 200, "out_of_memory": True}], 400) == pytest.approx(16.0)


def test_a_deadline_skips_the_batch_sizes_that_would_end_after_it(converted):
    from conftest import load_block_model

    model = load_block_model(converted("llama"))
    settings = BenchSettings(
        scenario="custom", prompt_len=4, gen_len=4, batch_sizes=[1, 2, 4], repeats=1, device="cpu", dtype="float32"
    )
    results = []
    sweep(model, settings, "model", results, deadline=time.perf_counter() + 1)  # the first size is always measured
    assert [r["batch_size"] for r in results] == [1, 2] and results[0]["tokens_per_second"] > 0
    assert results[1]["skipped"].startswith("predicted ")  # a new size needs at least 30 s: it ends the sweep
    results = []
    sweep(model, settings, "model", results, deadline=time.perf_counter() + 3600)
    assert [r["batch_size"] for r in results] == [1, 2, 4] and all("seconds" in r for r in results)


def test_out_of_memory_ends_the_search_and_is_recorded(converted):
    from conftest import load_block_model

    model = load_block_model(converted("llama"))
    real_generate = model.generate

    def generate(input_ids, **kwargs):  # stands in for a GPU that holds 3 rows
        if input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_generate(input_ids, **kwargs)

    model.generate = generate
    settings = BenchSettings(
        scenario="custom", prompt_len=4, gen_len=4, batch_sizes=None, repeats=1, device="cpu", dtype="float32"
    )
    results = []
    sweep(model, settings, "model", results)
    assert [r["batch_size"] for r in results] == [1, 4]
    assert results[-1] == {"batch_size": 4, "out_of_memory": True}


def test_bench_errors(converted, run_cli):
    model = converted("llama")
    result = run_cli("bench", model, "--device", "cpu", "--scenario", "custom", "--prompt-len", 4)
    assert result.exit_code == 1 and "custom needs --prompt-len and --gen-len" in result.stderr
    result = run_cli("bench", model, "--device", "cpu", "--batch-size", "many")
    assert result.exit_code == 1 and "--batch-size takes a number" in result.stderr
    result = run_cli("bench", model, "--device", "cpu", "--scenario", "fast")
    assert result.exit_code == 1 and "unknown scenario 'fast'" in result.stderr
