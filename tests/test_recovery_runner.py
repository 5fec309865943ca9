"""benchmarks/recovery.py end to end on a tiny model: train, score and report, as the recovery comparisons run it.

The runner's own scoring of each final model on the held-out windows must give the trainer's last held-out
evaluation (both float32 on the CPU, the same windows): an independent check that it scores the right
models on the right windows. Conversions are made once per set of options, and the report's gap fractions
follow from the curves."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import tiny_data  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "benchmarks" / "recovery.py"


def runner_module():
    spec = importlib.util.spec_from_file_location("benchmark_recovery", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, cwd: Path):
    result = subprocess.run(
        [sys.executable, str(RUNNER), *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # several tiny trainings in subprocesses
def test_train_score_and_report_a_plan(tiny_source, tiny_data, tmp_path):  # noqa: F811
    source, _ = tiny_source("llama")
    text = tmp_path / "ood.txt"
    text.write_text("\n\n".join(f"a sentence about the window number {i} and the cache." for i in range(200)))
    plan = {
        "source": str(source),
        "data": str(tiny_data),
        "recipe": "tiny-cpu",
        "overrides": [
            "seq_len=64",
            "micro_batch_size=2",
            "global_batch_size=4",
            "max_steps=4",
            "warmup_steps=1",
            "eval_every=2",
            "eval_windows=3",
            "log_every=1",
            "save_every=100",
            "convert.block_layers=2",
        ],
        "seeds": [0],
        "ood": str(text),
        "ood_windows": 3,
        "prompts": ["the cache"],
        "runs": [
            {"name": "ce"},
            {
                "name": "input1-sink-align-distill",
                "convert": {"token_input_layers": 1, "sink": "source"},
                "overrides": ["align.steps=1", "align.lr=3.0e-4", "distill.enabled=true", "distill.hidden_weight=0.5"],
            },
            {"name": "vanilla", "architecture": "vanilla"},
        ],
    }
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    run("train", plan_file, out, cwd=tmp_path)
    run("score", plan_file, out, cwd=tmp_path)
    report = run("report", out, cwd=tmp_path)

    results = json.loads((out / "results.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(results["runs"]) == ["ce-s0", "input1-sink-align-distill-s0", "vanilla-s0"]
    assert sorted(path.name for path in (out / "converted").iterdir()) == [
        "default",
        "sink=source-token-input-layers=1",
    ]
    for key, record in results["runs"].items():
        assert [point["step"] for point in record["curve"]] == [2, 4]
        assert all(point["tokens"] == point["step"] * 4 * 64 for point in record["curve"])
        assert record["curve"][0]["seconds"] < record["curve"][1]["seconds"]
        assert not (Path(record["final_model"]).parent / "checkpoints").exists()
        # the runner's float32 scoring of the final model = the trainer's last held-out evaluation
        assert scores[key]["held_out"] == pytest.approx(record["curve"][-1]["loss"], rel=1e-5)
        assert len(scores[key]["samples"]) == 1
    assert scores["source"]["held_out"] == pytest.approx(results["fresh"]["source"], rel=1e-6)
    assert scores["fresh default"]["held_out"] == pytest.approx(results["fresh"]["default"], rel=1e-6)
    assert set(scores) >= {"source", "fresh default", "fresh sink=source-token-input-layers=1"}

    recovery = runner_module()
    rows = recovery.summary(results)
    floor, ceiling = results["fresh"]["default"], rows["vanilla"]["mean"][4]
    expected = (floor - rows["ce"]["mean"][4]) / (floor - ceiling)
    assert recovery.gap_closed(rows, "ce", 4) == pytest.approx(expected)
    assert recovery.gap_closed(rows, "vanilla", 4) == pytest.approx(1.0)
    assert f"{expected:.1%}" in report
    assert (out / "recovery.png").stat().st_size > 0 and (out / "recovery.md").is_file()
