import os
import shutil

import pytest
import torch
from families import save_tiny_model
from typer.testing import CliRunner

from uptrain.cli import app
from uptrain.default_model import default_model_path
from uptrain.sources import load_model, load_tokenizer, resolve

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, and said so, on a machine without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """family -> (folder, source model); each family is built and saved once per session."""
    built = {}

    def get(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"src-{family}")
            built[family] = (folder, save_tiny_model(family, folder))
        return built[family]

    return get


@pytest.fixture(scope="session")
def run_cli():
    """Run `uptrain ARGS...` in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(arg) for arg in args])

    return run


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(gguf path, HF copy of it in float32, source model, tokenizer)."""
    gguf = default_model_path()
    source = load_model(resolve(str(gguf))).eval()
    tokenizer = load_tokenizer(resolve(str(gguf)))
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    source.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return gguf, folder, source, tokenizer


@pytest.fixture
def licensed_source(tiny_source, tmp_path):
    """A copy of the tiny Llama source whose model card declares a license (MIT)."""
    source, _ = tiny_source("llama")
    licensed = tmp_path / "licensed-source"
    shutil.copytree(source, licensed)
    (licensed / "README.md").write_text("---\nlicense: mit\n---\n# a tiny test model\n")
    return licensed


def load_block_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def converted(tiny_source, run_cli, tmp_path_factory):
    """family -> folder of its default conversion through the CLI (L_B 4, half the layers each, the token decoder
    headed by copies of the first two, a sink slot)."""
    folders = {}

    def get(family: str):
        if family not in folders:
            source_folder, _ = tiny_source(family)
            out = tmp_path_factory.mktemp(f"b4-{family}") / "model"
            result = run_cli("convert", source_folder, out)
            assert result.exit_code == 0, result.output
            folders[family] = out
        return folders[family]

    return get


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids a vanilla model needs to see a left-padded row as if it were alone."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def model_of(converted):
    """family -> loaded default conversion (`converted`), loaded once per test module."""
    models = {}

    def get(family):
        if family not in models:
            models[family] = load_block_model(converted(family))
        return models[family]

    return get
