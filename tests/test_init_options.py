"""Conversion options that keep more of the source's function at init: token-decoder input layers, the
attention-sink slot and the block decoder's final norm. Each places exactly the intended tensors (checked
against the source's own tensors and states), keeps contracts 1-3 and 5, and does to the identity invariant
(contract 4) what `ConvertOptions` says."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import load_block_model as load
from families import FAMILIES, tiny_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from uptrain.alignment import sink_slots
from uptrain.architectures import final_norm, layer_list_name, layers_of
from uptrain.card import model_card
from uptrain.convert import ConvertOptions, build_config, convert, select_layers
from uptrain.errors import UserError
from uptrain.modeling_block_transformer import BlockTransformerForCausalLM

VOCAB = 128
EOS, BOS = 2, 1  # the tiny tokenizer's </s> and <s>
LAYERS = 4  # every tiny family; the default split gives K = 2
ALL_ON = {"token_input_layers": 2, "sink": "source"}
PLAIN = {"token_input_layers": 0, "sink": "none"}  # the paper's conversion, which each test below adds one option to
# the families the contract checks run on, each with one block-norm kind (both kinds are covered)
CONTRACT_FAMILIES = {"llama": "fresh", "gpt2": "source", "gemma3_text": "fresh", "granite": "source"}


def saved_tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def conversion(tiny_source, tmp_path, family, **options):
    """The plain conversion of a tiny source with `options` on."""
    folder, source = tiny_source(family)
    out = tmp_path / "-".join([family, *map(str, options.values())])
    return convert(str(folder), out, ConvertOptions(**{**PLAIN, **options})), source


def residual_state(source, token, layers):
    """The source's residual state after `layers` layers at position 0 of a sequence that starts with `token`."""
    with torch.no_grad():
        return source.base_model(torch.tensor([[token]]), output_hidden_states=True).hidden_states[layers][0, 0]


def assert_refused(call, out, *phrases):
    with pytest.raises(UserError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message and message, message
    for phrase in phrases:
        assert phrase in message, message
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


# -- the tensors each option places ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_token_input_layers_copy_the_first_source_layers(family, tiny_source, tmp_path):
    out, source = conversion(tiny_source, tmp_path, family, token_input_layers=2)
    order = [0, 1, 2, 3]  # token decoder = copies of source layers 0, 1, then its own layers 2, 3
    config = json.loads((out / "config.json").read_text())
    assert config["source_layers"] == {"block_decoder": [0, 1], "token_decoder": order}
    assert config["prefix_length"] == 2
    assert len(layers_of(load(out).token_decoder.base_model)) == 4
    if "layer_types" in config["token_decoder"]:  # per-layer lists follow the layer selection
        assert config["token_decoder"]["layer_types"] == [source.config.layer_types[i] for i in order]

    saved = saved_tensors(out)
    base = source.base_model
    prefix, layers = source.base_model_prefix, layer_list_name(base)
    source_layers = dict(base.named_parameters())
    checked = 0
    for name, tensor in saved.items():
        head = f"token_decoder.{prefix}.{layers}."
        if name.startswith(head):
            index, rest = name.removeprefix(head).split(".", 1)
            torch.testing.assert_close(tensor, source_layers[f"{layers}.{order[int(index)]}.{rest}"], rtol=0, atol=0)
            checked += 1
    assert checked == 4 * sum(1 for name in source_layers if name.startswith(f"{layers}.0."))


@pytest.mark.parametrize("family", FAMILIES)
def test_sink_slot_is_the_source_state_of_eos(family, tiny_source, tmp_path):
    out, source = conversion(tiny_source, tmp_path, family, sink="source")
    config = json.loads((out / "config.json").read_text())
    assert config["prefix_length"] == 3  # the sink, then the user's r = 2
    record = json.loads((out / "conversion.json").read_text())
    assert record["options"]["prefix_length"] == 2 and record["options"]["sink"] == "source"
    assert record["sink_token"] == {"id": EOS, "text": "</s>"}
    assert "attention sink" in (out / "README.md").read_text()

    saved = saved_tensors(out)
    dim = source.config.hidden_size
    sink = residual_state(source, EOS, 2)
    torch.testing.assert_close(saved["expansion.bias"][:dim], sink, rtol=0, atol=1e-6)
    assert not saved["expansion.weight"][:dim].any() and not saved["expansion.bias"][dim:].any()
    torch.testing.assert_close(saved["expansion.weight"][dim:], torch.cat([torch.eye(dim)] * 2))

    model = load(out)  # loaded as saved: transformers' init does not overwrite the slot
    with torch.no_grad():
        prefix = model.expansion(torch.randn(5, dim)).unflatten(-1, (3, dim))  # (5, r+1, D)
    torch.testing.assert_close(prefix[:, 0], sink.expand(5, -1), rtol=0, atol=1e-6)


def without_special_tokens(folder, target, keep_bos: bool):
    """A copy of a tiny source whose tokenizer and config have no EOS (and no BOS unless `keep_bos`)."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["eos_token_id"] = None
    config["bos_token_id"] = config["bos_token_id"] if keep_bos else None
    (target / "config.json").write_text(json.dumps(config))
    (target / "generation_config.json").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / name).unlink(missing_ok=True)
    backend = tiny_tokenizer().backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if keep_bos else None, unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(target)
    return target


def test_sink_falls_back_to_bos_and_refuses_without_either(tiny_source, tmp_path):
    folder, source = tiny_source("llama")
    bos_only = without_special_tokens(folder, tmp_path / "bos-only", keep_bos=True)
    out = convert(str(bos_only), tmp_path / "sink-bos", ConvertOptions(sink="source"))
    assert json.loads((out / "conversion.json").read_text())["sink_token"]["id"] == BOS
    dim = source.config.hidden_size
    sink = saved_tensors(out)["expansion.bias"][:dim]
    torch.testing.assert_close(sink, residual_state(source, BOS, 2), rtol=0, atol=1e-6)

    neither = without_special_tokens(folder, tmp_path / "neither", keep_bos=False)
    assert_refused(lambda: convert(str(neither), tmp_path / "refused", ConvertOptions(sink="source")),
                   tmp_path / "refused", "--sink source needs an EOS or BOS token")
    assert_refused(  # the default sink too
        lambda: convert(str(neither), tmp_path / "default", ConvertOptions()),
        tmp_path / "default",
        "declare neither: convert with --sink none",
    )
    convert(str(neither), tmp_path / "no-sink", ConvertOptions(sink="none"))  # nothing else needs those tokens


def fresh_norm_state(source):
    """The final norm's tensors in a model of the source's architecture built from scratch."""
    scratch = AutoModelForCausalLM.from_config(source.config)
    return final_norm(scratch.base_model).state_dict()


@pytest.mark.parametrize("kind", ["source", "fresh"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_norm(family, kind, tiny_source, tmp_path):
    out, source = conversion(tiny_source, tmp_path, family, block_norm=kind)
    config = json.loads((out / "config.json").read_text())
    assert config["block_decoder_norm"] is True
    source_norm = final_norm(source.base_model)
    expected = source_norm.state_dict() if kind == "source" else fresh_norm_state(source)
    assert expected, "every tiny family's final norm has parameters"
    if kind == "fresh":  # random source norms: fresh differs from them
        assert any(not torch.equal(expected[key], value) for key, value in source_norm.state_dict().items())

    model = load(out)  # loaded as saved: transformers' re-initialisation leaves the norm alone
    block_norm = final_norm(model.block_decoder)
    assert set(block_norm.state_dict()) == set(expected)
    for key, value in block_norm.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    # the first block's context is what the block decoder outputs for a block of BOS tokens: normed too
    with torch.no_grad():
        start = block_norm(residual_state(source, BOS, 2))
    torch.testing.assert_close(model.start_context.detach(), start, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma"])  # weight 1; Gemma's (1 + w) norm: weight 0
def test_block_norm_from_scratch(family, tiny_source):
    _, source = tiny_source(family)
    options = ConvertOptions(token_input_layers=1, sink="source", block_norm="fresh")
    model = BlockTransformerForCausalLM(build_config(source.config, options, torch.float32)).eval()
    assert model.config.prefix_length == 3 and model.config.source_layers["token_decoder"] == [0, 2, 3]
    for key, value in final_norm(model.block_decoder).state_dict().items():
        torch.testing.assert_close(value, fresh_norm_state(source)[key], rtol=0, atol=0)
    ids = torch.randint(4, VOCAB, (2, 12))
    with torch.no_grad():
        output = model(ids, labels=ids)
    assert output.logits.shape == (2, 12, VOCAB) and torch.isfinite(output.loss)


def test_plain_conversion_and_older_folders_are_unchanged(tiny_source, tmp_path):
    """The plain conversion (token_input_layers 0, sink none) adds nothing; a folder whose config predates
    `block_decoder_norm` and whose record predates the options loads, scores and generates as it did, and the
    tools that read the record take it for the plain conversion."""
    out, source = conversion(tiny_source, tmp_path, "qwen2")
    config = json.loads((out / "config.json").read_text())
    assert config["block_decoder_norm"] is False and config["prefix_length"] == 2
    assert config["source_layers"] == select_layers(LAYERS, 2, "partition")
    saved = saved_tensors(out)
    assert not any(name.startswith("block_decoder.norm.") for name in saved)
    dim = source.config.hidden_size
    torch.testing.assert_close(saved["expansion.weight"], torch.cat([torch.eye(dim)] * 2), rtol=0, atol=0)
    torch.testing.assert_close(saved["start_context"], residual_state(source, BOS, 2), rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "attention sink" not in card and "final norm" not in card and "input layers" not in card

    ids = torch.randint(4, VOCAB, (2, 13))
    with torch.no_grad():
        plain = load(out)
        expected = plain(ids).logits
        expected_tokens = plain.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None)
    del config["block_decoder_norm"]
    (out / "config.json").write_text(json.dumps(config))
    record = json.loads((out / "conversion.json").read_text())
    for key in ("token_input_layers", "sink", "block_norm"):
        del record["options"][key]
    (out / "conversion.json").write_text(json.dumps(record))
    older = load(out)
    assert isinstance(final_norm(older.block_decoder), torch.nn.Identity)
    with torch.no_grad():
        assert torch.equal(older(ids).logits, expected)
        for engine in ("eager", "fast"):
            tokens = older.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, engine=engine)
            assert torch.equal(tokens, expected_tokens), engine
        greedy = older(expected_tokens).logits[:, ids.shape[1] - 1 : -1].argmax(-1)  # teacher-forced choices
        assert torch.equal(greedy, expected_tokens[:, ids.shape[1] :])
    assert sink_slots(record["options"]) == 0  # the align stage aligns every prefix slot
    card = model_card(config, record)
    assert "attention sink" not in card and "final norm" not in card and "input layers" not in card


# -- contract 4: which options keep the identity invariant -----------------------------------------------

KEEPS_EXACTLY = [{}, {"sink": "source"}, PLAIN]  # {}: the defaults (auto token_input_layers is 0 there)
KEEPS_UP_TO_EPSILON = [{"block_norm": "fresh", **PLAIN}, {"sink": "source", "block_norm": "fresh"}]
BREAKS = [
    {**PLAIN, "token_input_layers": 1},
    {"block_norm": "source", **PLAIN},
    {"token_input_layers": 1, "sink": "source"},
]
NORM_EPSILONS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")


def identity_error(folder, source, options, out):
    """Largest logit difference between the source and its identity conversion (L_B 1, all layers) with `options`."""
    torch.manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 13))
    converted = convert(str(folder), out, ConvertOptions(block_length=1, block_layers=LAYERS, **options))
    with torch.no_grad():
        return float((load(converted)(ids).logits - source(ids).logits).abs().max())


def with_epsilon(folder, target, epsilon):
    """A copy of a tiny source whose norms' epsilon is `epsilon`, and the model loaded from it."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    assert any(key in config for key in NORM_EPSILONS)
    config.update({key: epsilon for key in NORM_EPSILONS if key in config})
    (target / "config.json").write_text(json.dumps(config))
    return target, AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_invariant_with_options(family, tiny_source, tmp_path):
    """The defaults and the sink keep contract 4 exactly; a fresh block norm up to its epsilon (these random
    models' states have a mean square of about 4e-4, so their epsilon shows: with 1e-12 only rounding is left);
    more input layers and the source's norm break it."""
    folder, source = tiny_source(family)
    for number, options in enumerate(KEEPS_EXACTLY):
        assert identity_error(folder, source, options, tmp_path / f"exact-{number}") < 1e-5, options
    folder, source = with_epsilon(folder, tmp_path / "source", 1e-12)
    for number, options in enumerate(KEEPS_UP_TO_EPSILON + BREAKS):
        error = identity_error(folder, source, options, tmp_path / str(number))
        assert (error < 1e-4) == (options in KEEPS_UP_TO_EPSILON), (options, error)


# -- contracts 1-3 and 5 with the options on --------------------------------------------------------------


@pytest.fixture(scope="module")
def with_options(tiny_source, tmp_path_factory):
    """family -> folder converted with every option on (L_B 4, K 2, token decoder = layers 0, 1, 2, 3)."""
    folders = {}

    def get(family):
        if family not in folders:
            folder, _ = tiny_source(family)
            options = ConvertOptions(**ALL_ON, block_norm=CONTRACT_FAMILIES[family])
            folders[family] = convert(str(folder), tmp_path_factory.mktemp(f"options-{family}") / "model", options)
        return folders[family]

    return get


@pytest.fixture(scope="module")
def optioned_model(with_options):
    models = {}

    def get(family):
        if family not in models:
            models[family] = load(with_options(family))
        return models[family]

    return get


def left_padded(lengths, seed):
    torch.manual_seed(seed)
    rows = [torch.randint(4, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), 3)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return rows, ids, mask


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
def test_logits_loss_and_causality(family, optioned_model):
    model = optioned_model(family)
    assert model.config.prefix_length == 3
    assert type(final_norm(model.block_decoder)) is type(final_norm(model.token_decoder.base_model))
    rows, ids, mask = left_padded([11, 6, 3, 9], seed=3)
    with torch.no_grad():
        output = model(ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))
        assert output.logits.shape == (4, 11, VOCAB)
        expected = F.cross_entropy(output.logits[:, :-1].flatten(0, 1),
                                   torch.where(mask.bool(), ids, -100)[:, 1:].flatten(), ignore_index=-100)
        torch.testing.assert_close(output.loss, expected)
        for i, row in enumerate(rows):  # a padded row scores its tokens as when alone
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(output.logits[i, 11 - len(row) :], alone, atol=1e-5, rtol=1e-5)

        sequence = rows[0][None]
        logits = model(sequence).logits
        for t in range(sequence.shape[1] - 1):
            changed = sequence.clone()
            changed[:, t + 1 :] = torch.randint(4, VOCAB, changed[:, t + 1 :].shape)
            other = model(changed).logits
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("family", CONTRACT_FAMILIES)
def test_generation_with_options(family, optioned_model):
    """Greedy generate == teacher-forced argmax for every prompt length; the fast engine == the eager one;
    a left-padded batch == each prompt alone (contract 5)."""
    model = optioned_model(family)
    new = 9
    for length in range(1, 10):
        torch.manual_seed(length)
        prompt = torch.randint(4, VOCAB, (2, length))
        output = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert output.shape == (2, length + new) and torch.equal(output[:, :length], prompt)
        with torch.no_grad():
            forced = model(output).logits[:, length - 1 : -1].argmax(-1)
        assert torch.equal(output[:, length:], forced), length

    rows, ids, mask = left_padded([3, 9, 5, 1, 4, 7], seed=5)
    greedy = {"attention_mask": mask, "max_new_tokens": new, "do_sample": False, "eos_token_id": None}
    eager = model.generate(ids, engine="eager", **greedy)
    fast = model.generate(ids, engine="fast", **greedy)
    assert torch.equal(fast, eager)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert torch.equal(eager[i, ids.shape[1] :], alone[0, len(row) :]), i


STANDALONE = r"""
import json, sys, torch
sys.modules["uptrain"] = None  # the toolkit is absent: the folder's own code must do
from transformers import AutoModelForCausalLM
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out[name] = model(torch.arange(4, 17)[None]).logits[0].tolist()
print(json.dumps(out))
"""


def test_folders_with_options_load_where_the_toolkit_is_absent(with_options, optioned_model, tmp_path):
    jobs = {family: str(with_options(family)) for family in CONTRACT_FAMILIES}
    result = subprocess.run([sys.executable, "-c", STANDALONE, json.dumps(jobs)], check=False,
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = json.loads(result.stdout.strip().splitlines()[-1])
    for family in jobs:
        with torch.no_grad():
            expected = optioned_model(family)(torch.arange(4, 17)[None]).logits[0]
        torch.testing.assert_close(torch.tensor(logits[family]), expected, atol=1e-5, rtol=1e-5)


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, phrase", [
    ({"sink": "eos"}, "unknown sink 'eos': choose one of none, source"),
    ({"sink": None}, "unknown sink None"),
    ({"block_norm": "ones"}, "unknown block norm 'ones': choose one of none, fresh, source"),
    ({"block_norm": True}, "unknown block norm True"),
    ({"token_input_layers": "2"}, "--token-input-layers must be a whole number, got '2'"),
    ({"token_input_layers": 1.0}, "--token-input-layers must be a whole number"),
    ({"token_input_layers": True}, "--token-input-layers must be a whole number"),
    ({"token_input_layers": -1}, "--token-input-layers must be 0 or more, got -1"),
    ({"method": "shuffle"}, "unknown method 'shuffle'"),
    ({"prefix_length": 0}, "--prefix-length must be at least 1"),
])
def test_bad_option_values(options, phrase):
    with pytest.raises(UserError) as refused:
        ConvertOptions(**options)
    assert phrase in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("options, phrase", [
    ({"token_input_layers": 3}, "--token-input-layers 3 is more than the 2 source layers below the token decoder's"),
    ({"token_input_layers": 2, "method": "skip"}, "more than the 1 source layers below"),  # token decoder: 1, 3
    ({"token_input_layers": 1, "method": "duplicate"}, "more than the 0 source layers below"),
])
def test_token_input_layers_beyond_the_bound(options, phrase, tiny_source, tmp_path):
    folder, _ = tiny_source("llama")
    assert_refused(lambda: convert(str(folder), tmp_path / "out", ConvertOptions(**options)), tmp_path / "out", phrase)


def test_token_input_layers_bound():
    assert select_layers(6, 3, "partition", 3)["token_decoder"] == [0, 1, 2, 3, 4, 5]
    assert select_layers(6, 3, "skip", 1)["token_decoder"] == [0, 1, 3, 5]
    assert select_layers(6, 6, "partition", 6)["token_decoder"] == list(range(6))  # empty token decoder: any N <= n
    with pytest.raises(UserError):
        select_layers(6, 3, "partition", 4)
