"""`uptrain quickstart`, shortened to 2 steps: every stage runs offline and the summary is complete."""

import json
import math


def test_quickstart_runs_every_stage(run_cli, smollm2, tmp_path):
    out = tmp_path / "qs"
    result = run_cli("quickstart", out, "--steps", 2)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary["results"])
    assert names == ["source (vanilla)", "converted, before uptraining", "uptrained (2 steps)"]
    for name in names:
        figures = summary["results"][name]
        assert math.isfinite(figures["loss"]) and figures["bits_per_byte"] > 0
        assert summary["samples"][name].startswith("The Python standard library")
    tokens = {summary["results"][name]["tokens"] for name in names}
    assert len(tokens) == 1  # the same held-out windows for all three
    assert summary["results"]["source (vanilla)"]["loss"] < summary["results"]["converted, before uptraining"]["loss"]
    final = out / "run" / "final"
    for required in ("config.json", "README.md", "training.json", "conversion.json", "tokenizer.json", "modeling_block_transformer.py"):
        assert (final / required).is_file(), required
    assert "| source (vanilla) |" in (out / "summary.md").read_text()
