"""`uptrain quickstart`, shortened to 2 steps: every stage runs offline, the summary is complete and the
output folder can be pushed as is."""

import json
import math

import yaml
from hub_server import HubServer


def test_quickstart_runs_every_stage(run_cli, smollm2, tmp_path, monkeypatch):
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

    # pushed as is: the uptrained model, its card carrying the license, base model and the evaluation
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer("hf_qs") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = run_cli("push", out, "someone/quickstart", "--token", "hf_qs")
        assert result.exit_code == 0, result.output
        received = hub.files("someone/quickstart")
    assert received == {str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    card = received["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "apache-2.0" and metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    uptrained = summary["results"]["uptrained (2 steps)"]
    assert f"| this model | {uptrained['loss']:.4f} |" in card and "| sequence length | 128 |" in card
