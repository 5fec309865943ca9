"""Model building (`uptrain.models`): random weights for measurement, the distillation teacher's resolution."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_block_model

from uptrain.errors import UserError
from uptrain.models import random_model, teacher_spec
from uptrain.recipe import load_recipe
from uptrain.records import CONVERSION

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_random_model_has_the_shape_of_the_model_it_stands_for(family, tiny_source, converted):
    """A source and its conversion: the same parameter names and shapes as the loaded models, new values,
    the asked dtype, eval mode."""
    source_folder, source = tiny_source(family)
    for spec, loaded in ((str(source_folder), source), (str(converted(family)), load_block_model(converted(family)))):
        model = random_model(spec, "cpu", "bfloat16")
        assert not model.training and type(model).__name__ == type(loaded).__name__
        built = {name: p for name, p in model.named_parameters()}
        expected = {name: p for name, p in loaded.named_parameters()}
        assert {n: p.shape for n, p in built.items()} == {n: p.shape for n, p in expected.items()}
        assert all(p.dtype == torch.bfloat16 for p in built.values())
        name = next(n for n in built if n.endswith(("layers.0.mlp.down_proj.weight", "h.0.mlp.c_proj.weight")))
        assert not torch.equal(built[name].float(), expected[name].float())


def test_random_model_refuses_a_device_it_cannot_use(tiny_source):
    source_folder, _ = tiny_source("llama")
    with pytest.raises(UserError, match="cannot build .* on 'nonsense'"):
        random_model(str(source_folder), "nonsense")
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        random_model(str(source_folder), "cpu", "float8")


def test_the_teacher_of_a_converted_folder_comes_from_its_conversion_record(converted, tmp_path):
    folder = converted("llama")
    recipe = load_recipe(TINY_RECIPE, [f"source={folder}", f"output_dir={tmp_path}", "distill.enabled=true"])
    record = json.loads((folder / CONVERSION).read_text())  # converted from a local folder: no hub id
    local = f"distillation needs its teacher: .* \\({record['source']}\\); set distill.teacher"
    with pytest.raises(UserError, match=local):
        teacher_spec(recipe)
    assert teacher_spec(load_recipe(TINY_RECIPE, [f"source={folder}", "distill.teacher=some/model"])) == "some/model"

    hub = tmp_path / "from-hub"  # a Block Transformer folder converted from a hub id
    hub.mkdir()
    (hub / "config.json").write_bytes((folder / "config.json").read_bytes())
    record.update(source="org/model", source_fingerprint={"hub_id": "org/model"})
    (hub / CONVERSION).write_text(json.dumps(record))
    assert teacher_spec(load_recipe(TINY_RECIPE, [f"source={hub}"])) == "org/model"
    source = load_recipe(TINY_RECIPE, ["source=org/vanilla"])
    assert teacher_spec(source) == "org/vanilla"  # a vanilla source teaches its own conversion
