"""`uptrain quickstart` as a pip user runs it: the wheel built from this checkout, installed into a fresh virtual
environment, run from a folder outside the checkout and shortened to 1 step. Every stage runs offline, the
summary is complete and the output folder can be pushed as is."""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer

from uptrain.default_model import cache_dir

pytestmark = pytest.mark.slow  # a wheel build, subprocesses and the real weights

REPO = Path(__file__).resolve().parents[1]
BUILD_FROM = ("pyproject.toml", "README.md", "uptrain", "recipes")  # the files the wheel is built from


def run(command: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`command` in a process that cannot see the checkout: no PYTHONPATH, started outside it."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_TOKEN")}
    environment.update(UPTRAIN_CACHE=str(cache_dir()), TOKENIZERS_PARALLELISM="false", **env)
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh virtual environment holding the wheel built from this checkout. Its dependencies are
    this environment's, reached through a plain path entry (.pth): nothing is downloaded, and this checkout's
    editable install, if any, stays inactive there."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build writes nothing into the checkout
    source.mkdir()
    for name in BUILD_FROM:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], root)
    (wheel,) = (root / "dist").glob("block_uptrain-*.whl")

    venv.create(root / "venv", with_pip=False)
    (site,) = (root / "venv" / "lib").glob("python*/site-packages")
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "test-dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    bin_dir = root / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], root)
    return bin_dir


def test_the_wheel_holds_the_package_its_recipes_and_no_cli_module(installed, tmp_path):
    probe = ("import importlib.util, uptrain; "
             "print(uptrain.__file__); print(importlib.util.find_spec('cli') is None)")
    package, no_cli = run([installed / "python", "-c", probe], tmp_path).stdout.split()
    assert Path(package).is_relative_to(installed.parent) and not Path(package).is_relative_to(REPO)
    assert no_cli == "True"  # nothing named `cli` is installed

    listed = run([installed / "uptrain", "recipes"], tmp_path).stdout
    names = [line.split()[0] for line in listed.splitlines()]
    assert names == ["smollm2-135m-b4", "tiny-cpu", "accelerate/ddp", "accelerate/fsdp"]
    run([installed / "python", "-m", "uptrain", "recipes", "copy", "accelerate/ddp", tmp_path / "ddp.yaml"], tmp_path)
    assert (tmp_path / "ddp.yaml").read_text() == (REPO / "recipes" / "accelerate" / "ddp.yaml").read_text()


def test_quickstart_runs_every_stage(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    run([installed / "uptrain", "quickstart", "qs", "--steps", 1], work)
    out = work / "qs"
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary["results"])
    assert names == ["source (vanilla)", "converted, before uptraining", "uptrained (1 step)"]
    for name in names:
        figures = summary["results"][name]
        assert math.isfinite(figures["loss"]) and figures["bits_per_byte"] > 0
        assert summary["samples"][name].startswith("The Python standard library")
    tokens = {summary["results"][name]["tokens"] for name in names}
    assert len(tokens) == 1  # the same held-out windows for all three
    assert summary["results"]["source (vanilla)"]["loss"] < summary["results"]["converted, before uptraining"]["loss"]
    final = out / "run" / "final"
    for required in ("config.json", "README.md", "training.json", "conversion.json", "tokenizer.json",
                     "modeling_block_transformer.py"):
        assert (final / required).is_file(), required
    assert "| source (vanilla) |" in (out / "summary.md").read_text()

    # pushed as is: the uptrained model, its card carrying the license, base model and the evaluation
    with HubServer("hf_qs") as hub:
        run([installed / "uptrain", "push", "qs", "someone/quickstart", "--token", "hf_qs"], work,
            HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        received = hub.files("someone/quickstart")
    assert received == {str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    card = received["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "apache-2.0" and metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    uptrained = summary["results"]["uptrained (1 step)"]
    assert f"| this model | {uptrained['loss']:.4f} |" in card and "| sequence length | 128 |" in card
