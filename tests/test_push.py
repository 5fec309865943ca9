"""`uptrain push` end to end: the real huggingface_hub client against a hub-compatible server on 127.0.0.1."""

import socket
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer

SAMPLE = Path(__file__).parent / "data" / "sample.txt"
TOKEN = "hf_test_secret_token_1234"


@pytest.fixture
def model_with_license(licensed_source, run_cli, tmp_path):
    """A converted tiny Llama whose source declares a license, evaluated once (eval_results.json)."""
    model = tmp_path / "model"
    assert run_cli("convert", licensed_source, model).exit_code == 0
    result = run_cli("eval", model, "--data", SAMPLE, "--baseline", licensed_source, "--seq-len", 64,
                     "--max-windows", 4)
    assert result.exit_code == 0, result.output
    return model


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.mark.parametrize("upload", ["xet-pipeline", "single-commit"])
def test_push_uploads_every_file_and_the_card(model_with_license, hub, run_cli, monkeypatch, upload):
    # huggingface_hub uploads through hf_xet's streamed pipeline when hf_xet is installed, else in one
    # commit; users get either, so both client paths are exercised.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", upload == "single-commit")
    result = run_cli("push", model_with_license, "someone/tiny-block", "--token", TOKEN)
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output

    received = hub.files("someone/tiny-block")
    on_disk = {str(p.relative_to(model_with_license)): p.read_bytes()
               for p in model_with_license.rglob("*") if p.is_file()}
    assert received == on_disk  # every file, byte for byte, the card included
    assert {"model.safetensors", "config.json", "modeling_block_transformer.py", "README.md"} <= set(received)

    card = received["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "mit" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation" and "block-transformer" in metadata["tags"]
    assert 'from_pretrained("someone/tiny-block", trust_remote_code=True)' in card
    assert "## Evaluation" in card and "baseline:" in card and "| block length | 4 |" in card


def test_push_to_a_branch_of_an_existing_repo(model_with_license, hub, run_cli):
    assert run_cli("push", model_with_license, "someone/tiny-block", "--token", TOKEN).exit_code == 0
    result = run_cli("push", model_with_license, "someone/tiny-block", "--token", TOKEN, "--revision", "dev",
                     "--private", "--commit-message", "second")
    assert result.exit_code == 0, result.output
    assert hub.files("someone/tiny-block", "dev") == hub.files("someone/tiny-block")


def test_token_from_environment_and_a_kept_readme(model_with_license, hub, run_cli, monkeypatch):
    (model_with_license / "README.md").write_text("# my own card\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = run_cli("push", model_with_license, "tiny-block")
    assert result.exit_code == 0, result.output
    assert "kept the existing README.md" in result.output
    assert hub.files("someone/tiny-block")["README.md"] == b"# my own card\n"  # a bare name goes under the user


def test_dry_run_writes_the_card_and_uploads_nothing(model_with_license, hub, run_cli):
    (model_with_license / "README.md").unlink()
    result = run_cli("push", model_with_license, "someone/tiny-block", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "nothing uploaded" in result.output
    assert (model_with_license / "README.md").read_text().startswith("---\n")
    assert hub.requests == []


def test_push_errors_are_one_line_and_never_show_the_token(model_with_license, hub, run_cli, monkeypatch, tmp_path):
    result = run_cli("push", model_with_license, "someone/tiny-block", "--token", "hf_wrong_token_987")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: the Hub refused someone/tiny-block (HTTP 401): check --token or HF_TOKEN and your write access"
    )

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    result = run_cli("push", model_with_license, "someone/tiny-block", "--token", TOKEN)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: cannot reach the Hub at http://127.0.0.1:{closed}")
    assert TOKEN not in result.output

    result = run_cli("push", tmp_path / "nowhere", "someone/x")
    assert result.exit_code == 1 and "model folder not found" in result.stderr
    result = run_cli("push", SAMPLE.parent, "someone/x")
    assert result.exit_code == 1 and "is not a Block Transformer folder" in result.stderr
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    requests = len(hub.requests)
    for bad in ("some one/bad id", "bad id"):
        result = run_cli("push", model_with_license, bad, "--token", TOKEN)
        assert result.exit_code == 1 and "invalid repository id" in result.stderr
    assert len(hub.requests) == requests  # refused before asking the Hub anything


def test_published_files_name_no_local_paths(licensed_source, run_cli, tmp_path):
    """A model converted, uptrained and evaluated from local folders names them in its card and records by
    their folder or file names only: pushing it publishes no path of the machine it was made on."""
    from families import tiny_tokenizer
    from test_train import TINY_RECIPE, corpus_file, tiny_overrides

    from uptrain.data import prepare

    prepare(str(corpus_file(tmp_path / "corpus.txt", documents=60)), tmp_path / "tokens", tiny_tokenizer(),
            val_fraction=0.1, tokenizer_name="tiny")
    run = tmp_path / "run"
    result = run_cli("train", TINY_RECIPE, *tiny_overrides(licensed_source, tmp_path / "tokens", run, max_steps=2,
                                                           save_every=2, eval_every=2))
    assert result.exit_code == 0, result.output
    final = run / "final"
    result = run_cli("eval", final, "--data", SAMPLE, "--baseline", licensed_source, "--seq-len", 64,
                     "--max-windows", 2)
    assert result.exit_code == 0, result.output
    assert run_cli("push", final, "someone/x", "--dry-run").exit_code == 0  # writes the card from the records

    local_roots = [str(tmp_path), str(Path(tmp_path).resolve()), str(SAMPLE.parent.resolve())]
    for folder in (run / "converted", final):
        for path in folder.iterdir():
            if path.suffix in (".md", ".json", ".yaml"):
                text = path.read_text()
                assert not any(root in text for root in local_roots), f"{path.name} names a local path"
    assert "`licensed-source`" in (final / "README.md").read_text()
    assert "source: licensed-source" in (final / "recipe.yaml").read_text()
    assert "sample.txt" in (final / "eval_results.json").read_text()


def test_distilling_into_a_locally_converted_folder_needs_the_teacher_named(licensed_source, run_cli, tmp_path):
    """Records name a local source without its path, so the default teacher cannot be found from them."""
    from families import tiny_tokenizer
    from test_train import TINY_RECIPE, corpus_file, tiny_overrides

    from uptrain.data import prepare

    model = tmp_path / "model"
    assert run_cli("convert", licensed_source, model).exit_code == 0
    prepare(str(corpus_file(tmp_path / "corpus.txt", documents=60)), tmp_path / "tokens", tiny_tokenizer(),
            val_fraction=0.1, tokenizer_name="tiny")
    settings = tiny_overrides(model, tmp_path / "tokens", tmp_path / "run", max_steps=2, save_every=2)
    result = run_cli("train", TINY_RECIPE, *settings, "distill.enabled=true")
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "converted from a local model (licensed-source)" in message and "set distill.teacher" in message
    result = run_cli("train", TINY_RECIPE, *settings, "distill.enabled=true", f"distill.teacher={licensed_source}")
    assert result.exit_code == 0, result.output
