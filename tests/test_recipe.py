"""Recipes: every shipped one validates; unknown keys and wrong types are one-line errors naming the key."""

from pathlib import Path

import pytest

from uptrain.errors import UserError
from uptrain.recipe import Recipe, load_recipe
from uptrain.train import lr_factor

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"tiny-cpu.yaml", "smollm2-135m-b4.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.seq_len % recipe.convert.block_length == 0
    assert recipe.total_steps() > 0


def test_real_recipe_matches_the_paper_schedule():
    recipe = load_recipe(Path(RECIPES[0]).parent / "smollm2-135m-b4.yaml")
    assert (recipe.seq_len, recipe.global_batch_size, recipe.max_steps, recipe.warmup_steps) == (2048, 256, 57200, 3000)
    assert recipe.betas == [0.9, 0.95] and recipe.weight_decay == 0.1 and recipe.precision == "bf16"
    assert (recipe.convert.block_length, recipe.convert.block_layers, recipe.convert.prefix_length) == (4, 15, 2)


def test_overrides_are_dotted_and_typed(tmp_path):
    path = Path(RECIPES[0]).parent / "tiny-cpu.yaml"
    overrides = ["lr=1e-4", "distill.enabled=true", "distill.weight=0.3", "max_steps=7", "betas=[0.8, 0.9]"]
    recipe = load_recipe(path, overrides)
    assert recipe.lr == 1e-4 and recipe.distill.enabled and recipe.distill.weight == 0.3
    assert recipe.max_steps == 7 and recipe.betas == [0.8, 0.9]
    assert load_recipe(path, ["max_steps=", "max_tokens=4096"]).total_steps() == 8  # 4 x 128 tokens a step


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rate=1e-4", "unknown recipe key 'learning_rate'"),
        ("distill.alpha=1", "unknown recipe key 'distill.alpha'"),
        ("lr=fast", "recipe key 'lr' must be float, got 'fast'"),
        ("max_steps=2.5", "recipe key 'max_steps' must be int, got 2.5"),
        ("precision=fp8", "recipe key 'precision' must be one of fp32, bf16, fp16"),
        ("betas=[0.9]", "recipe key 'betas' must have two values"),
        ("micro_batch_size=3", "'global_batch_size' must be a multiple of 'micro_batch_size'"),
        ("lr", "override 'lr' is not key=value"),
        ("convert.sink=eos", "recipe key 'convert.sink' must be one of none, source, got 'eos'"),
        ("convert.block_norm=ones", "recipe key 'convert.block_norm' must be one of none, fresh, source, got 'ones'"),
        ("convert.method=shuffle", "recipe key 'convert.method' must be one of partition, skip, duplicate"),
        ("convert.token_input_layers=-1", "recipe key 'convert.token_input_layers' must be 0 or more"),
        ("convert.token_input_layers=two", "recipe key 'convert.token_input_layers' must be int, got 'two'"),
        ("convert.prefix_length=0", "recipe key 'convert.prefix_length' must be at least 1"),
        ("distill.hidden_weight=0.5", "recipe key 'distill.hidden_weight' needs distill.enabled: true"),
        ("distill.hidden_weight=-1", "recipe key 'distill.hidden_weight' must be 0 or more, got -1.0"),
    ],
)
def test_bad_recipe_keys(override, message):
    with pytest.raises(UserError, match=None) as error:
        load_recipe(Path(RECIPES[0]).parent / "tiny-cpu.yaml", [override])
    assert message in str(error.value)


def test_unknown_key_through_the_cli(run_cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: default\ndata: d\noutput_dir: o\nmax_steps: 1\nwarmup: 3\n")
    result = run_cli("train", recipe)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: unknown recipe key 'warmup'"


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, 10, 100, 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_architecture_is_checked():
    path = Path(RECIPES[0]).parent / "tiny-cpu.yaml"
    with pytest.raises(UserError, match="recipe key 'architecture' must be one of block, vanilla"):
        load_recipe(path, ["architecture=moe"])
    with pytest.raises(UserError, match="recipe key 'from_scratch' must be bool"):
        load_recipe(path, ["from_scratch=maybe"])


def test_the_convert_section_reaches_the_conversion():
    """Every key of a recipe's `convert:` section is passed to `ConvertOptions` by name."""
    from uptrain.models import convert_options

    keys = ["convert.token_input_layers=2", "convert.sink=source", "convert.block_norm=fresh", "convert.block_length=2",
            "convert.block_layers=3", "convert.method=partition", "convert.prefix_length=3"]
    options = convert_options(load_recipe(Path(RECIPES[0]).parent / "tiny-cpu.yaml", keys).convert)
    assert (options.token_input_layers, options.sink, options.block_norm) == (2, "source", "fresh")
    assert (options.block_length, options.block_layers, options.method, options.prefix_length) == (2, 3, "partition", 3)


def test_token_input_layers_null_or_omitted_is_automatic(tmp_path):
    """`token_input_layers: null`, or the key left out, is auto (None), resolved by the conversion; a number is kept."""
    from uptrain.convert import resolved
    from uptrain.models import convert_options

    base = "source: default\ndata: d\noutput_dir: o\nmax_steps: 1\n"
    sections = {
        "null": "convert:\n  token_input_layers: null\n",
        "omitted": "convert:\n  block_layers: 3\n",
        "none": "",
    }
    for name, section in sections.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(base + section)
        recipe = load_recipe(path)
        assert recipe.convert.token_input_layers is None and recipe.convert.sink == "source"
        options = resolved(convert_options(recipe.convert), 30)
        assert options.token_input_layers == 2, name
    explicit = load_recipe(tmp_path / "null.yaml", ["convert.token_input_layers=1", "convert.sink=none"]).convert
    assert resolved(convert_options(explicit), 30).token_input_layers == 1 and explicit.sink == "none"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_list_the_recovery_keys_with_their_defaults(path):
    """The conversion options, hidden-state distillation and the alignment stage are written out, at their defaults."""
    import dataclasses

    import yaml

    from uptrain.convert import resolved
    from uptrain.models import convert_options
    from uptrain.recipe import AlignSection, ConvertSection

    raw = yaml.safe_load(path.read_text())
    assert set(raw["convert"]) == {f.name for f in dataclasses.fields(ConvertSection)}
    recipe = load_recipe(path)
    defaults = ConvertSection()
    assert (recipe.convert.sink, recipe.convert.block_norm) == (defaults.sink, defaults.block_norm)
    # token_input_layers: null (auto), or the number auto gives for the recipe's split of SmolLM2's 30 layers
    automatic = resolved(convert_options(dataclasses.replace(recipe.convert, token_input_layers=None)), 30)
    assert recipe.convert.token_input_layers in (None, automatic.token_input_layers)
    assert raw["align"] == dataclasses.asdict(AlignSection()) and raw["distill"]["hidden_weight"] == 0.0
