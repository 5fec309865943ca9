"""The Hugging Face Hub path, end to end with the real client against the hub-compatible server on 127.0.0.1:
`uptrain convert HUB_ID` (download, revision and card metadata recorded, then offline from the cache), and a
pushed model loading from the hub in a process that cannot import block-uptrain."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import HubServer
from safetensors.torch import load_file

TOKEN = "hf_test_secret_token_1234"
UPTRAIN = [sys.executable, "-m", "uptrain"]  # the command, in a fresh process


def run(args: list[str], endpoint: str, home: Path, **env) -> subprocess.CompletedProcess:
    """A fresh process: huggingface_hub reads HF_ENDPOINT and its cache folder when it is imported."""
    environment = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **env)
    environment.pop("HF_TOKEN", None)
    return subprocess.run(args, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_convert_a_hub_model_then_again_offline(licensed_source, run_cli, tmp_path):
    published = licensed_source
    local = tmp_path / "local"
    assert run_cli("convert", published, local).exit_code == 0
    home = tmp_path / "hf-home"

    with HubServer(TOKEN) as hub:
        hub.add_repo("someone/tiny-llama", published)
        commit = hub.commit_of("someone/tiny-llama")
        result = run([*UPTRAIN, "convert", "someone/tiny-llama", str(tmp_path / "online")], hub.url, home)
        assert result.returncode == 0, result.stderr
        downloads = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
        assert any(path.endswith("/model.safetensors") for path in downloads)

    record = json.loads((tmp_path / "online" / "conversion.json").read_text())
    assert record["source_fingerprint"] == {"hub_id": "someone/tiny-llama", "revision": commit}
    assert record["license"] == "mit" and record["base_model"] == "someone/tiny-llama"
    card = yaml.safe_load((tmp_path / "online" / "README.md").read_text().split("---")[1])
    assert card["license"] == "mit" and card["base_model"] == "someone/tiny-llama"
    online = load_file(tmp_path / "online" / "model.safetensors")
    expected = load_file(local / "model.safetensors")
    assert online.keys() == expected.keys() and all(torch.equal(online[k], expected[k]) for k in online)

    # the server is gone: the cached snapshot is enough
    offline = [*UPTRAIN, "convert", "someone/tiny-llama", str(tmp_path / "offline")]
    result = run(offline, hub.url, home, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    conversion = json.loads((tmp_path / "offline" / "conversion.json").read_text())
    assert conversion["source_fingerprint"]["revision"] == commit


LOAD_WITHOUT_TOOLKIT = """
import sys
sys.modules["uptrain"] = None  # importing block-uptrain now fails: the model must bring its own code
sys.modules["cli"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("someone/tiny-block", trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7]])
with torch.no_grad():
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.save({"logits": model(ids).logits, "generated": generated}, sys.argv[1])
"""


@pytest.mark.slow
def test_a_pushed_model_loads_from_the_hub_without_the_toolkit(converted, run_cli, monkeypatch, tmp_path):
    from conftest import load_block_model

    folder = converted("qwen2")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert run_cli("push", folder, "someone/tiny-block", "--token", TOKEN).exit_code == 0
        result = run([sys.executable, "-c", LOAD_WITHOUT_TOOLKIT, str(tmp_path / "out.pt")], hub.url, tmp_path / "home")
        assert result.returncode == 0, result.stderr

    got = torch.load(tmp_path / "out.pt")
    model = load_block_model(folder)
    ids = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7]])
    with torch.no_grad():
        assert torch.equal(got["logits"], model(ids).logits)
        assert torch.equal(got["generated"], model.generate(ids, max_new_tokens=6, do_sample=False))
