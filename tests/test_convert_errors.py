"""Contract 6: each user mistake gives one clear line on stderr, a non-zero exit, no traceback, no output."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]


def assert_refused(result, out: Path, *phrases: str):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_missing_source(run_cli, tmp_path):
    result = run_cli("convert", tmp_path / "nowhere", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "source not found", "nowhere")


def test_folder_without_config(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("convert", tmp_path / "empty", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "no config.json")


def test_encoder_only_model(run_cli, tmp_path):
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    BertModel(config).save_pretrained(tmp_path / "bert")
    result = run_cli("convert", tmp_path / "bert", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "unsupported model", "'bert'")


@pytest.mark.parametrize("layers", [0, 5, -1])
def test_block_layers_out_of_range(run_cli, tiny_source, tmp_path, layers):
    folder, _ = tiny_source("llama")  # 4 layers
    result = run_cli("convert", folder, tmp_path / "out", "--block-layers", layers)
    assert_refused(result, tmp_path / "out", "--block-layers", "between 1 and 4")


def test_unknown_method(run_cli, tiny_source, tmp_path):
    folder, _ = tiny_source("llama")
    result = run_cli("convert", folder, tmp_path / "out", "--method", "shuffle")
    assert_refused(result, tmp_path / "out", "unknown method 'shuffle'", "partition")


def test_truncated_safetensors(run_cli, tiny_source, tmp_path):
    folder, _ = tiny_source("llama")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli("convert", broken, tmp_path / "out")
    assert_refused(result, tmp_path / "out", "cannot load the weights")


def test_existing_output_needs_overwrite(run_cli, tiny_source, tmp_path):
    folder, _ = tiny_source("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_cli("convert", folder, out)
    assert result.exit_code != 0
    message = f"error: output folder {out} is not empty (use --overwrite to replace it)"
    assert result.stderr.strip().splitlines() == [message]
    assert (out / "keep.txt").read_text() == "user data"

    result = run_cli("convert", folder, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_unreachable_hub(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("convert", "some-org/not-cached-model", tmp_path / "out")
    assert_refused(result, tmp_path / "out", "some-org/not-cached-model")


@pytest.mark.slow
def test_gguf_without_gguf_package(tmp_path):
    """A real process where `import gguf` fails: the message says how to install it, no traceback."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    script = "import sys; sys.modules['gguf'] = None; from uptrain.cli import app; sys.argv[0] = 'uptrain'; app()"
    result = subprocess.run(
        [sys.executable, "-c", script, "convert", str(fake), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert result.returncode == 1
    message = "error: reading GGUF files needs the gguf package: pip install 'block-uptrain[gguf]'"
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()
