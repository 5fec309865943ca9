"""The alignment stage (`align:` in a recipe): its targets against the source's own hidden states, its training
run (loss falls, only the stage's parts move, the schedule), exact resume inside the stage, and its refusals.

Families: llama (rotary positions, tied head) and gpt2 (learned absolute positions, which the source's states
and the prefix both carry)."""

import json
import shutil

import pytest
import torch
from conftest import load_block_model
from test_train import TINY_RECIPE, final_weights, losses, tiny_data, tiny_overrides  # noqa: F401 (fixture)

from uptrain.alignment import PrefixAlignment, relative_mse, source_stack, target_tokens, trained_parameters
from uptrain.convert import ConvertOptions, convert
from uptrain.errors import UserError
from uptrain.objective import NextTokenObjective
from uptrain.recipe import load_recipe
from uptrain.train import staged_lr_factor

FAMILIES = ("llama", "gpt2")
K = 2  # block_layers of every conversion here (tiny sources have 4 layers)
IDS = torch.randint(4, 128, (3, 24), generator=torch.Generator().manual_seed(7))


def source_states(source, ids):
    """The source's hidden states entering layer K, from the whole source model (the reference)."""
    with torch.no_grad():
        return source(ids, output_hidden_states=True).hidden_states[K]  # (B, T, D)


def conversion(tiny_source, tmp_path, family, **options):
    folder, source = tiny_source(family)
    options = {"block_layers": K, **options}
    out = tmp_path / "-".join([family, *(f"{k}{v}" for k, v in options.items())])
    return load_block_model(convert(str(folder), out, ConvertOptions(**options))), source


def alignment_loss(model, source, sink: bool, loss: str = "relative_mse"):
    objective = NextTokenObjective(model, alignment=PrefixAlignment(source_stack(source, K, 64), int(sink), loss))
    with torch.no_grad():
        return objective(IDS, align=True)


# -- targets -----------------------------------------------------------------------------------------------


def test_target_tokens_by_hand():
    first, tokens = target_tokens(blocks=4, block_length=4, prefix_slots=2)  # 16 tokens, r 2
    assert first == 1 and tokens.tolist() == [[2, 3], [6, 7], [10, 11], [14, 15]]  # block 4: past the end
    first, tokens = target_tokens(blocks=4, block_length=4, prefix_slots=6)  # block 1 has only 4 tokens before it
    assert first == 2 and tokens.tolist() == [[2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, 11], [10, 11, 12, 13, 14, 15]]
    first, tokens = target_tokens(blocks=3, block_length=1, prefix_slots=1)
    assert first == 1 and tokens.tolist() == [[0], [1], [2]]
    assert target_tokens(blocks=1, block_length=4, prefix_slots=6)[1].numel() == 0


@pytest.mark.parametrize("sink", ["none", "source"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_one_token_block_conversion_is_aligned_at_init(family, sink, tiny_source, tmp_path):
    """L 1, r 1, partition: the fresh conversion's prefix of block j is exactly the source's state entering layer K
    at token j-1, so the loss is 0; the same prefixes against the next token's or the one before's states, or the
    sink slot scored as well, give a large loss: an off-by-one block or token would show."""
    model, source = conversion(tiny_source, tmp_path, family, block_length=1, prefix_length=1, sink=sink)
    loss, ce = alignment_loss(model, source, sink == "source")
    assert float(loss) < 1e-10 and torch.isfinite(ce)

    states = source_states(source, IDS)  # (B, T, D)
    with torch.no_grad():
        prefix = model.prefix_states(model.block_contexts(IDS, None, past_end=True))  # (B, T+1, r', D)
    aligned = prefix[:, 1:, -1]  # (B, T, D): block j+1's last slot, which targets token j
    assert float(relative_mse(aligned, states)) < 1e-10
    assert float(relative_mse(aligned[:, 1:], states[:, :-1])) > 1e-3  # one token late
    assert float(relative_mse(aligned[:, :-1], states[:, 1:])) > 1e-3  # one token early
    if sink == "source":
        assert float(relative_mse(prefix[:, 1:, 0], states)) > 1e-3  # the sink slot has no target


@pytest.mark.parametrize("loss", ["relative_mse", "cosine"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_four_prefix_two_against_a_hand_built_reference(family, loss, tiny_source, tmp_path):
    """L 4, r 2 with a sink: every prefix slot against the source's state at the hand-computed token, in float64."""
    model, source = conversion(tiny_source, tmp_path, family, block_length=4, prefix_length=2, sink="source")
    got, _ = alignment_loss(model, source, sink=True, loss=loss)

    states = source_states(source, IDS).double()
    with torch.no_grad():
        hidden = model.block_decoder(inputs_embeds=model.embed_blocks(IDS)).last_hidden_state  # (B, 6, D)
        terms = []
        for j in range(1, IDS.shape[1] // 4 + 1):  # block j's context: the block decoder's output at block j-1
            prefix = model.expansion(hidden[:, j - 1]).double().view(len(IDS), 3, -1)  # slot 0: the sink
            for i in (1, 2):
                p, h = prefix[:, i], states[:, 4 * j - 2 + i - 1]
                if loss == "relative_mse":
                    terms.append((p - h).pow(2).sum(-1) / h.pow(2).sum(-1))
                else:
                    terms.append(1 - torch.nn.functional.cosine_similarity(p, h, dim=-1))
    expected = torch.stack(terms).mean()
    assert float(expected) > 0.01  # the fresh L 4 prefixes are not the source's states
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_the_source_stack_gives_the_source_states(tiny_source):
    """The frozen copy of the source's first K layers: the states entering layer K of the whole source model,
    for every K up to all layers (then before the final norm), without gradients."""
    _, source = tiny_source("gpt2")
    for layers in (1, 2, 4):
        stack = source_stack(source, layers, 64)
        assert len(stack.h) == layers and not any(p.requires_grad for p in stack.parameters())
        with torch.no_grad():
            got = stack(input_ids=IDS).last_hidden_state
            if layers < 4:
                expected = source_states_at(source, layers)
            else:  # hidden_states[-1] is after the final norm: the last layer's output instead
                captured = {}
                hook = source.transformer.ln_f.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
                source(IDS)
                hook.remove()
                expected = captured["x"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="hidden size 64 and 4 layers; the model needs hidden size 32"):
        source_stack(source, 2, 32)


def source_states_at(source, layers):
    with torch.no_grad():
        return source(IDS, output_hidden_states=True).hidden_states[layers]


def test_trained_parameters_are_the_block_decoders_and_the_new_parts(tiny_source, tmp_path):
    model, _ = conversion(tiny_source, tmp_path, "llama", block_norm="fresh")
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)] for p in trained_parameters(model)}
    assert {name for name in names.values() if name.startswith("block_decoder.layers.")} < trained
    prefixes = {name.split(".")[0] if not name.startswith("block_decoder") else ".".join(name.split(".")[:2])
                for name in trained}
    assert prefixes == {"block_decoder.layers", "block_decoder.norm", "embedder_projection", "expansion",
                        "start_context"}


# -- the stage in a run ------------------------------------------------------------------------------------


def log_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def align_overrides(source, data, out, **extra):
    settings = {"max_steps": 6, "align.steps": 6, "eval_every": 3, "save_every": 6, "align.lr": "3e-4", **extra}
    return tiny_overrides(source, data, out, **settings)


# llama with the recipe's conversion options that keep more of the function (a sink slot, which has no target,
# and a fresh block-decoder norm, which the stage trains); gpt2 with today's conversion
CONVERSIONS = {"llama": {"token_input_layers": 1, "sink": "source", "block_norm": "fresh"}, "gpt2": {}}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stage_lowers_its_loss_and_moves_only_its_parts(family, tiny_source, tiny_data, tmp_path, run_cli):  # noqa: F811
    """A run that is all alignment: the alignment loss falls; the cross-entropy and the held-out loss are logged;
    the embedding tables and the whole token decoder end bit for bit as converted, the stage's parts moved."""
    source, _ = tiny_source(family)
    options = CONVERSIONS[family]
    convert_keys = {f"convert.{key}": value for key, value in options.items()}
    result = run_cli("train", TINY_RECIPE, *align_overrides(source, tiny_data, tmp_path, **convert_keys))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "converted" / "conversion.json").read_text())
    assert record["options"] == {**record["options"], **options}  # the recipe's convert section, as given
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    align = [r["train/align_loss"] for r in records]
    assert sum(align[-3:]) / 3 < 0.9 * align[0], align  # each step's loss is on its own batch: the last three
    assert all(r["train/loss"] > 0 for r in records)
    assert [r["step"] for r in records if "eval/val_loss" in r] == [3, 6]

    before = final_weights_of(tmp_path / "converted")
    after = final_weights(tmp_path)
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    stage = ("block_decoder.layers.", "block_decoder.h.", "block_decoder.norm.", "embedder_projection.", "expansion.",
             "start_context")
    assert all(name.startswith(stage) for name in moved), sorted(moved)
    if options:
        assert "block_decoder.norm.weight" in moved
    frozen = {name for name in before if not name.startswith(stage)}
    assert any(name.startswith("token_decoder.") for name in frozen)
    assert any(name.startswith(("block_decoder.embed_tokens.", "block_decoder.wte.")) for name in frozen)
    assert {"embedder_projection.weight", "expansion.weight"} <= moved
    assert any(name.startswith(("block_decoder.layers.", "block_decoder.h.")) for name in moved)


def final_weights_of(folder):
    from safetensors.torch import load_file

    weights = {}
    for path in folder.glob("*.safetensors"):
        weights.update(load_file(path))
    return weights


def test_the_schedule_of_the_two_stages(tiny_source, tiny_data, tmp_path, run_cli, monkeypatch):  # noqa: F811
    """The stage warms up to align.lr over 10% of its steps (at least 1), decays by cosine to min_lr_ratio of it;
    the end-to-end stage then runs the recipe's own schedule over the remaining steps. MFU (here of a pretend
    GPU) is logged for the end-to-end steps only: the stage runs part of the model."""
    import uptrain.train

    monkeypatch.setattr(uptrain.train, "peak_flops", lambda device: 1e9)
    factors = [staged_lr_factor(s, warmup=2, total=30, min_ratio=0.1, align_steps=20, align_scale=5.0)
               for s in range(31)]
    assert factors[0] == pytest.approx(2.5) and factors[1] == pytest.approx(5.0)  # warm-up: 2 of 20 steps
    assert all(a >= b for a, b in zip(factors[1:20], factors[2:20])) and factors[19] > 0.5
    assert factors[20] == pytest.approx(0.5) and factors[21] == pytest.approx(1.0)  # the recipe's warm-up
    assert factors[30] == pytest.approx(0.1)
    assert staged_lr_factor(0, 2, 30, 0.1, align_steps=5, align_scale=5.0) == pytest.approx(5.0)  # at least 1 step

    source, _ = tiny_source("llama")
    overrides = align_overrides(source, tiny_data, tmp_path, max_steps=5, **{"align.steps": 3, "save_every": 5})
    result = run_cli("train", TINY_RECIPE, *overrides)
    assert result.exit_code == 0, result.output
    records = log_records(tmp_path)
    recipe = load_recipe(TINY_RECIPE, overrides)
    for record in records:  # the rate logged after step s is the one for the next step
        expected = recipe.lr * staged_lr_factor(record["step"], recipe.warmup_steps, 5, recipe.min_lr_ratio, 3,
                                                recipe.align.lr / recipe.lr)
        assert record["train/lr"] == pytest.approx(expected, rel=1e-12)
    assert ["train/align_loss" in r for r in records] == [True, True, True, False, False]
    assert ["train/mfu" in r for r in records] == [False, False, False, True, True]


@pytest.mark.slow
def test_a_run_resumed_inside_the_stage_equals_the_uninterrupted_run(tiny_source, tiny_data, tmp_path, run_cli):  # noqa: F811
    """gpt2 (dropout: the random states matter) cut back to its step-2 checkpoint, inside a 4-step stage, and
    resumed: the same losses, alignment losses and final weights, bit for bit, as the run that went straight."""
    from test_multi_process import truncated

    source, _ = tiny_source("gpt2")
    settings = {"max_steps": 6, "align.steps": 4, "save_every": 2, "eval_every": 3, "log_every": 1}
    straight = tmp_path / "straight"
    result = run_cli("train", TINY_RECIPE, *align_overrides(source, tiny_data, straight, **settings))
    assert result.exit_code == 0, result.output
    again = truncated(straight, tmp_path / "again", 2)
    result = run_cli("train", TINY_RECIPE, *align_overrides(source, tiny_data, again, **settings))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in log_records(again)] == list(range(1, 7))
    assert losses(again) == losses(straight)
    assert [r.get("train/align_loss") for r in log_records(again)] == [
        r.get("train/align_loss") for r in log_records(straight)]
    a, b = final_weights(again), final_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in b)


@pytest.mark.slow
def test_the_compiled_stage_gives_the_eager_run(tiny_source, tiny_data, tmp_path, run_cli):  # noqa: F811
    """`compile=true`: the alignment source's states compiled, the stacks compiled whole; the same curves."""
    source, _ = tiny_source("llama")
    curves = {}
    for compiled in ("true", "false"):
        out = tmp_path / compiled
        settings = {"max_steps": 3, "align.steps": 2, "save_every": 3, "eval_every": 3, "compile": compiled}
        result = run_cli("train", TINY_RECIPE, *align_overrides(source, tiny_data, out, **settings))
        assert result.exit_code == 0, result.output
        curves[compiled] = [[r.get(key, 0.0) for r in log_records(out)] for key in ("train/loss", "train/align_loss")]
    torch.testing.assert_close(torch.tensor(curves["true"]), torch.tensor(curves["false"]), rtol=1e-4, atol=0)


# -- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("align.loss=mse", "recipe key 'align.loss' must be one of relative_mse, cosine, got 'mse'"),
    ("align.steps=1.5", "recipe key 'align.steps' must be int, got 1.5"),
    ("align.steps=-1", "recipe key 'align.steps' must be 0 or more, got -1"),
    ("align.steps=31", "recipe key 'align.steps' (31) is longer than the run (30 steps)"),
    ("align.lr=0", "recipe keys 'align.lr' and 'lr' must be positive with an align stage"),
    ("align.lr=fast", "recipe key 'align.lr' must be float, got 'fast'"),
    ("align.targets=x", "unknown recipe key 'align.targets'"),
])
def test_bad_align_keys(override, message):
    extra = [] if override.startswith("align.steps") else ["align.steps=5"]
    with pytest.raises(UserError) as error:
        load_recipe(TINY_RECIPE, [override, *extra])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["architecture=vanilla"], "the align stage needs a converted Block Transformer (architecture: block"),
    (["from_scratch=true"], "the align stage needs a converted Block Transformer"),
    (["convert.method=skip"], "the align stage needs convert.method partition, got 'skip'"),
    (["convert.method=duplicate"], "the align stage needs convert.method partition, got 'duplicate'"),
])
def test_what_the_stage_cannot_take(overrides, message):
    with pytest.raises(UserError) as error:
        load_recipe(TINY_RECIPE, ["align.steps=5", *overrides])
    assert message in str(error.value)
    load_recipe(TINY_RECIPE, overrides)  # fine without the stage


def refused(run_cli, *overrides):
    """One error line on stderr, exit 1, no traceback."""
    result = run_cli("train", TINY_RECIPE, *overrides)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert not any(line.startswith("error: ") for line in lines[:-1])
    return lines[-1]


def test_refusals_write_nothing(tiny_source, tiny_data, tmp_path, run_cli):  # noqa: F811
    source, _ = tiny_source("llama")
    out = tmp_path / "out"
    message = refused(run_cli, *align_overrides(source, tiny_data, out, **{"align.steps": 7}))
    assert message == "error: recipe key 'align.steps' (7) is longer than the run (6 steps)"
    assert not out.exists()

    message = refused(run_cli, *align_overrides(source, tiny_data, out, seq_len=4, **{"convert.prefix_length": 6}))
    assert message == "error: seq_len 4 leaves no block with 6 tokens before it to align"
    assert not out.exists()

    for method in ("skip", "duplicate"):  # a folder converted with another method
        folder = tmp_path / method
        assert run_cli("convert", source, folder, "--method", method, "--block-layers", 2).exit_code == 0
        message = refused(run_cli, *align_overrides(folder, tiny_data, out))
        assert "the align stage needs a model converted with the partition method" in message, message
        assert not out.exists()

    local = tmp_path / "local"  # converted from a local folder: its record names no path to find the source by
    assert run_cli("convert", source, local, "--block-layers", 2).exit_code == 0
    message = refused(run_cli, *align_overrides(local, tiny_data, out))
    assert message.startswith("error: the align stage needs its source: ") and "set distill.teacher" in message
    assert not out.exists()

    unrecorded = tmp_path / "unrecorded"  # a folder without its conversion record: is slot 0 a sink?
    shutil.copytree(tmp_path / "skip", unrecorded)
    (unrecorded / "conversion.json").unlink()
    assert "conversion.json" in refused(run_cli, *align_overrides(unrecorded, tiny_data, out))
    assert not out.exists()


def test_a_source_of_another_width_is_refused(tiny_source, tiny_data, tmp_path, run_cli):  # noqa: F811
    from families import save_tiny_model

    source, _ = tiny_source("llama")
    converted = tmp_path / "converted"
    assert run_cli("convert", source, converted, "--block-layers", 2).exit_code == 0
    narrow = tmp_path / "narrow"
    model = save_tiny_model("llama", narrow)
    model.config.hidden_size = 32
    model.config.head_dim = 8
    type(model)(model.config).save_pretrained(narrow)
    message = refused(run_cli, *align_overrides(converted, tiny_data, tmp_path / "out", **{"distill.teacher": narrow}))
    assert "the align stage's source has hidden size 32" in message, message
    hidden = {"align.steps": 0, "distill.enabled": "true", "distill.hidden_weight": 0.5, "distill.teacher": narrow}
    message = refused(run_cli, *align_overrides(converted, tiny_data, tmp_path / "out", **hidden))
    assert "distill.hidden_weight needs a teacher whose final states are as wide as the model's (64)" in message


def test_the_card_names_the_stage_and_hidden_distillation():
    from uptrain.card import model_card

    config = {"token_decoder": {"model_type": "llama"}, "block_length": 4, "prefix_length": 2}
    training = {"steps": 10, "tokens": 5120}
    plain = model_card(config, training=training, recipe={"distill": {"enabled": False}, "align": {"steps": 0}})
    assert "alignment stage" not in plain and "hidden states" not in plain
    recipe = {"distill": {"enabled": True, "weight": 0.5, "hidden_weight": 0.25},
              "align": {"steps": 4, "lr": 0.001, "loss": "relative_mse"}}
    card = model_card(config, training=training, recipe=recipe)
    assert "| alignment stage | the first 4 steps: block decoder and new parts matched to the source's states " \
           "(relative_mse, peak learning rate 0.001) |" in card
    assert "| distillation | weight 0.5, final hidden states weight 0.25 |" in card
