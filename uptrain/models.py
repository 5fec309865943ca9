"""Every model a run trains or measures, built in one place.

- `training_model`: what a recipe trains, float32 on the CPU: the conversion of `source` (made once, by the
  main process), `source` itself when it is a converted folder or the run is vanilla, or random weights of
  its shape (`from_scratch`, with every padding row trainable: scratch.py);
- `load_teacher` and `teacher_on`: the frozen distillation teacher, and its copy for the run's device;
- `random_model`: random weights of any model's shape on a device in a dtype, for throughput measurement
  (`uptrain bench`), and `random_source`, a vanilla model of random weights saved as a source folder (the
  training benchmarks); `initial_model` builds from a config alone, on any device ("meta" for sizes).

`model_config` reads every configuration the toolkit builds float weights from (a GGUF source's quantization
dropped, `sources.dequantized`).
"""

from pathlib import Path

import torch
from torch import nn

from .architectures import BLOCK_MODEL_TYPE, is_block_folder
from .errors import UserError, first_line
from .recipe import ConvertSection, Recipe
from .records import CONVERSION, read_json
from .scratch import train_padding_rows
from .sources import DTYPES, dequantized, load_config, load_model, resolve

HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a recipe's half precisions as dtypes


def convert_options(section: ConvertSection):
    """The `convert` options of a recipe's `convert:` section."""
    from .convert import ConvertOptions

    return ConvertOptions(
        block_length=section.block_length, block_layers=section.block_layers, method=section.method,
        prefix_length=section.prefix_length, token_input_layers=section.token_input_layers, sink=section.sink,
        block_norm=section.block_norm,
    )


def model_config(spec: str):
    """The configuration of a Block Transformer folder or of any source `resolve` accepts."""
    from transformers import AutoConfig

    if is_block_folder(spec):
        return AutoConfig.from_pretrained(spec, trust_remote_code=True)
    return dequantized(load_config(resolve(spec)))


def converted_folder(recipe: Recipe, accelerator) -> Path:
    """The Block Transformer folder to uptrain: `source` itself, or `output_dir/converted`, converted by the
    main process when it is not there yet while the others wait."""
    from .convert import convert

    if is_block_folder(recipe.source):
        return Path(recipe.source)
    converted = Path(recipe.output_dir) / "converted"
    if accelerator.is_main_process and not (converted / "config.json").is_file():
        convert(recipe.source, converted, convert_options(recipe.convert))
    accelerator.wait_for_everyone()
    return converted


def training_model(recipe: Recipe, accelerator) -> tuple[nn.Module, str]:
    """(float32 model, the folder or source spec that holds its tokenizer and records) of a recipe.

    block: the conversion of `source` (or `source` itself when it is converted already); vanilla: `source` as
    it is. From scratch, either architecture gets random weights of `source`'s shape."""
    from transformers import AutoModelForCausalLM

    if recipe.from_scratch:
        return scratch_model(recipe.source, recipe.architecture, recipe.convert), recipe.source
    if recipe.architecture == "vanilla":
        return load_model(resolve(recipe.source), "float32"), recipe.source
    folder = str(converted_folder(recipe, accelerator))
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32), folder


def scratch_model(spec: str, architecture: str, section: ConvertSection) -> nn.Module:
    """Random float32 weights of `spec`'s shape (see `initial_model`), every padding row drawn and trainable."""
    model = initial_model(model_config(spec), architecture, section)
    train_padding_rows(model)  # a zero padding row makes NaN gradients in deep stacks (scratch.py)
    return model


def initial_model(config, architecture: str, section: ConvertSection) -> nn.Module:
    """A float32 model with transformers' initial weights, on the default device ("meta": the shapes alone):
    `config`'s vanilla model, or its Block Transformer (`config` itself when it is one, else `section`'s
    conversion of it)."""
    from transformers import AutoModelForCausalLM

    from .convert import build_config
    from .modeling_block_transformer import BlockTransformerForCausalLM

    if architecture == "vanilla":
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.model_type != BLOCK_MODEL_TYPE:
        config = build_config(config, convert_options(section), torch.float32)
    return BlockTransformerForCausalLM(config).float()


def teacher_spec(recipe: Recipe) -> str:
    """The distillation teacher, also the align stage's source: `distill.teacher`, else the vanilla source,
    which is `source` unless that is a converted folder; then its conversion record names the source, found
    again only when it is a hub id (records name a local source without its path)."""
    if recipe.distill.teacher is not None:
        return recipe.distill.teacher
    if not is_block_folder(recipe.source):
        return recipe.source
    record = read_json(Path(recipe.source) / CONVERSION) or {}
    if "hub_id" not in record.get("source_fingerprint", {}):
        named = f" ({record['source']})" if record.get("source") else ""
        need = "distillation needs its teacher" if recipe.distill.enabled else "the align stage needs its source"
        raise UserError(f"{need}: {recipe.source} was converted from a local "
                        f"model{named}; set distill.teacher to that model's path")
    return record["source"]


def load_teacher(recipe: Recipe) -> nn.Module:
    """The frozen teacher, float32 on the CPU."""
    return load_model(resolve(teacher_spec(recipe)), "float32").eval().requires_grad_(False)


def teacher_on(teacher: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """The teacher on the run's device; on a GPU in the run's half precision (it only runs forward)."""
    dtype = HALF_PRECISION.get(precision, torch.float32) if device.type == "cuda" else torch.float32
    return teacher.to(device=device, dtype=dtype)


def random_model(spec: str, device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """A model of `spec`'s shape (a Block Transformer folder or a source) with random weights, built on
    `device` in `dtype` (a name in `sources.DTYPES`), in eval mode: where speed, not values, is measured."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose {', '.join(DTYPES)}")
    config = model_config(spec)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=DTYPES[dtype])
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"cannot build {spec} on {device!r}: {first_line(error)}") from None
    return model.eval()


def random_source(config_dir: Path, folder: Path, seed: int = 0) -> Path:
    """`folder`: a vanilla model of `config_dir`'s shape (its config.json and tokenizer) with random float32
    weights drawn as for training from scratch, saved as a source with its tokenizer; made once."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        scratch_model(str(config_dir), "vanilla", ConvertSection()).save_pretrained(folder)
        AutoTokenizer.from_pretrained(config_dir).save_pretrained(folder)
    return folder
