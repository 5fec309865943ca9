"""Layer methods, dtype, records and the written folder."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from uptrain.convert import ConvertOptions, resolved, select_layers
from uptrain.errors import UserError

PLAIN = ("--token-input-layers", 0, "--sink", "none")  # the paper's conversion: the layer methods and init alone


def test_select_layers():
    assert select_layers(6, 3, "partition") == {"block_decoder": [0, 1, 2], "token_decoder": [3, 4, 5]}
    assert select_layers(6, 3, "skip") == {"block_decoder": [0, 2, 4], "token_decoder": [1, 3, 5]}
    assert select_layers(6, 6, "duplicate") == {"block_decoder": list(range(6)), "token_decoder": list(range(6))}
    assert select_layers(6, 6, "partition")["token_decoder"] == []
    with pytest.raises(UserError):
        select_layers(6, 7, "partition")


def saved_tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.mark.parametrize("method", ["skip", "duplicate"])
def test_methods_take_the_right_source_layers(method, tiny_source, run_cli, tmp_path):
    folder, source = tiny_source("qwen2")
    out = tmp_path / method
    result = run_cli("convert", folder, out, "--method", method, "--block-layers", 2, *PLAIN)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "conversion.json").read_text())
    layers = select_layers(4, 2, method)
    assert record["source_layers"] == layers
    saved = saved_tensors(out)
    weights = dict(source.named_parameters())
    for new, old in enumerate(layers["block_decoder"]):
        torch.testing.assert_close(saved[f"block_decoder.layers.{new}.mlp.up_proj.weight"],
                                   weights[f"model.layers.{old}.mlp.up_proj.weight"], rtol=0, atol=0)
    for new, old in enumerate(layers["token_decoder"]):
        torch.testing.assert_close(saved[f"token_decoder.model.layers.{new}.self_attn.q_proj.bias"],
                                   weights[f"model.layers.{old}.self_attn.q_proj.bias"], rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(4, 20)[None], labels=torch.arange(4, 20)[None]).loss)


def test_initialisation_and_dtype(tiny_source, run_cli, tmp_path):
    folder, source = tiny_source("llama")
    out = tmp_path / "bf16"
    result = run_cli("convert", folder, out, "--dtype", "bfloat16", "--block-length", 2, "--prefix-length", 3, *PLAIN)
    assert result.exit_code == 0, result.output
    saved = saved_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    dim = source.config.hidden_size
    eye = torch.eye(dim, dtype=torch.bfloat16)
    torch.testing.assert_close(saved["embedder_projection.weight"], torch.cat([eye / 2, eye / 2], dim=1))
    torch.testing.assert_close(saved["expansion.weight"], torch.cat([eye] * 3, dim=0))
    assert not saved["embedder_projection.bias"].any() and not saved["expansion.bias"].any()
    # the first block's context is the source's residual state after the block layers on the BOS token
    with torch.no_grad():
        bos = source.model(torch.tensor([[1]]), output_hidden_states=True).hidden_states[2][0, 0]
    torch.testing.assert_close(saved["start_context"].float(), bos, atol=2e-2, rtol=2e-2)
    assert "token_decoder.lm_head.weight" not in saved  # tied to the token decoder's embeddings

    config = json.loads((out / "config.json").read_text())
    assert (config["block_length"], config["prefix_length"], config["dtype"]) == (2, 3, "bfloat16")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "trust_remote_code=True" in card and "block length | 2" in card
    record = json.loads((out / "conversion.json").read_text())
    assert record["options"]["dtype"] == "bfloat16" and "model.safetensors" in record["source_fingerprint"]["sha256"]


def test_the_function_keeping_options_through_the_cli(tiny_source, run_cli, tmp_path):
    """--token-input-layers, --sink and --block-norm reach `ConvertOptions`: the same folder as the API writes."""
    from uptrain.convert import convert

    folder, _ = tiny_source("llama")
    flags = ["--token-input-layers", 1, "--sink", "source", "--block-norm", "fresh"]
    result = run_cli("convert", folder, tmp_path / "cli", "--block-layers", 2, *flags)
    assert result.exit_code == 0, result.output
    options = ConvertOptions(block_layers=2, token_input_layers=1, sink="source", block_norm="fresh")
    convert(str(folder), tmp_path / "api", options)
    records = [json.loads((tmp_path / name / "conversion.json").read_text()) for name in ("cli", "api")]
    assert records[0]["options"] == records[1]["options"] == {**records[1]["options"], "token_input_layers": 1,
                                                               "sink": "source", "block_norm": "fresh"}
    cli, api = saved_tensors(tmp_path / "cli"), saved_tensors(tmp_path / "api")
    assert cli.keys() == api.keys() and all(torch.equal(cli[name], api[name]) for name in api)

    shown = run_cli("convert", "--help").output
    for flag in ("--token-input-layers", "--sink", "--block-norm"):
        assert flag in shown


@pytest.mark.parametrize("flags, message", [
    (["--sink", "eos"], "error: unknown sink 'eos': choose one of none, source"),
    (["--block-norm", "ones"], "error: unknown block norm 'ones': choose one of none, fresh, source"),
    (["--token-input-layers", -1], "error: --token-input-layers must be 0 or more, got -1"),
    (["--token-input-layers", 3], "error: --token-input-layers 3 is more than the 2 source layers below the token"),
])
def test_bad_function_keeping_options_through_the_cli(flags, message, tiny_source, run_cli, tmp_path):
    folder, _ = tiny_source("llama")
    result = run_cli("convert", folder, tmp_path / "out", "--block-layers", 2, *flags)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_automatic_token_input_layers():
    """None (the default) is min(2, the source layers below the token decoder's own), 0 when it has none of its
    own: the identity conversion (K = n) and duplicate (whose token decoder starts at layer 0) get 0, skip (whose
    block decoder always holds layer 0) at most 1."""
    cases = {  # (layers, K, method) -> N
        (30, None, "partition"): 2,
        (4, 2, "partition"): 2,
        (4, 1, "partition"): 1,
        (4, 4, "partition"): 0,
        (4, 2, "skip"): 1,
        (6, 2, "skip"): 1,
        (4, 4, "skip"): 0,
        (4, 2, "duplicate"): 0,
        (4, 4, "duplicate"): 0,
    }
    for (total, block_layers, method), expected in cases.items():
        options = resolved(ConvertOptions(block_layers=block_layers, method=method), total)
        assert options.token_input_layers == expected, (total, block_layers, method)
        assert options.block_layers == (block_layers or total // 2) and options.sink == "source"
        select_layers(total, options.block_layers, method, expected)  # within the bound
    for explicit in (0, 1, 2):
        assert resolved(ConvertOptions(token_input_layers=explicit), 4).token_input_layers == explicit
    assert ConvertOptions().token_input_layers is None and ConvertOptions().block_norm == "none"


@pytest.mark.parametrize(
    "flags, block_layers, token_layers",
    [
        ((), 2, [0, 1, 2, 3]),  # the defaults: K = n // 2 = 2, auto N = 2, a sink
        (("--block-length", 1, "--block-layers", 4), 4, []),  # the identity conversion: auto N = 0
        (("--token-input-layers", 1), 2, [0, 2, 3]),  # an explicit value is kept
        (("--token-input-layers", 0), 2, [2, 3]),
    ],
)
def test_conversion_records_the_resolved_options(flags, block_layers, token_layers, tiny_source, run_cli, tmp_path):
    folder, _ = tiny_source("llama")
    out = tmp_path / "out"
    result = run_cli("convert", folder, out, *flags)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "conversion.json").read_text())
    token_input_layers = len(token_layers) - len([i for i in token_layers if i >= block_layers])
    assert record["options"]["block_layers"] == block_layers
    assert record["options"]["token_input_layers"] == token_input_layers
    assert record["options"]["sink"] == "source" and record["sink_token"]["id"] == 2  # the tiny tokenizer's </s>
    assert record["source_layers"]["token_decoder"] == token_layers
    config = json.loads((out / "config.json").read_text())
    assert config["source_layers"] == record["source_layers"] and config["prefix_length"] == 3  # r 2 + the sink
    card = (out / "README.md").read_text()
    assert "attention sink" in card
    assert (f"copies of the source's first {token_input_layers}" in card) == (token_input_layers > 0)


def test_help_shows_the_defaults():
    from typer.testing import CliRunner

    from uptrain.cli import app

    wide = {"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}  # one line per option
    shown = " ".join(CliRunner().invoke(app, ["convert", "--help"], env=wide).output.split())
    assert "auto: min(2, the source layers below the token decoder's own)" in shown
    assert "[default: source]" in shown and "[default: none]" in shown
