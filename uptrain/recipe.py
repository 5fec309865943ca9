"""Training recipes: YAML files validated against a typed schema, with dotted `key=value` overrides."""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
ARCHITECTURES = ("block", "vanilla")
TRACKERS = ("tensorboard", "wandb", "none")
ALIGN_LOSSES = ("relative_mse", "cosine")


@dataclass
class ConvertSection:
    """How `source` is converted when it is a vanilla model (see `uptrain convert --help`). `token_input_layers`
    null (the default) is auto: min(2, the source layers below the token decoder's own), 0 when the token decoder
    has no layers of its own (an identity conversion stays the identity). With `sink: source` this start
    recovers faster than the paper's plain conversion (`token_input_layers: 0`, `sink: none`):
    docs/results/recovery-cpu.md."""

    block_length: int = 4  # tokens per block, L_B
    block_layers: int | None = None  # source layers for the block decoder, K (default: half of them, n // 2)
    method: str = "partition"  # partition | skip | duplicate: how the source layers go to the two decoders
    prefix_length: int = 2  # prefix vectors r the context expands into
    token_input_layers: int | None = None  # the token decoder also gets copies of the source's first N; null: auto
    sink: str = "source"  # source | none: one more prefix slot holding the source's state of EOS at position 0
    block_norm: str = "none"  # none | fresh | source: the block decoder's final norm


@dataclass
class DistillSection:
    """A frozen teacher: (1-weight)*CE + weight*T^2*KL(teacher || student) + hidden_weight*relative MSE of the
    final states (what each head consumes) at the same positions."""

    enabled: bool = False  # distil from a frozen teacher
    teacher: str | None = None  # default: the vanilla source model
    weight: float = 0.5  # share of the KL term; 1 - weight goes to the cross-entropy
    temperature: float = 1.0  # softmax temperature T of teacher and student in the KL term
    hidden_weight: float = 0.0  # weight of the relative MSE between the final states of model and teacher


@dataclass
class AlignSection:
    """The alignment stage (`uptrain/alignment.py`): the run's first `steps` optimizer steps train the block decoder
    and the new parts so that the prefix vectors match the source's states; 0: no such stage."""

    steps: int = 0  # optimizer steps of the stage, at the start of the run (counted in the run's steps)
    lr: float = 1e-3  # peak learning rate of the stage
    loss: str = "relative_mse"  # relative_mse: mean of |p - h|^2 / |h|^2 per vector; cosine: mean of 1 - cos(p, h)


@dataclass
class Recipe:
    source: str  # a vanilla model to convert first, or an already converted folder
    data: str  # a folder written by `uptrain data prepare`
    output_dir: str  # checkpoints/, final/, train_log.jsonl and, for a source to convert, converted/
    architecture: str = "block"  # block: the Block Transformer of `source`; vanilla: `source` itself as a causal LM
    from_scratch: bool = False  # random weights: `source` gives only the configuration and the tokenizer
    convert: ConvertSection = field(default_factory=ConvertSection)  # used when `source` is not converted yet
    seq_len: int = 2048  # tokens per training sequence (a multiple of the block length)
    micro_batch_size: int = 8  # sequences per forward pass on each process
    global_batch_size: int = 256  # sequences per optimizer step, over all processes
    max_steps: int | None = None  # optimizer steps of the run (give this or max_tokens)
    max_tokens: int | None = None  # used when max_steps is not given
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr x min_lr_ratio
    warmup_steps: int = 3000  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    grad_clip: float = 1.0  # clip the gradient norm to this; 0: measure it without clipping
    precision: str = "bf16"  # fp32 | bf16 | fp16: autocast over float32 weights
    eval_every: int = 500  # steps between held-out evaluations (and one at the end)
    eval_windows: int = 64  # held-out windows of seq_len tokens per evaluation
    save_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are deleted
    log_every: int = 10  # steps between lines of train_log.jsonl and the trackers
    seed: int = 0  # weights built from scratch, sample order and block offsets
    block_offset: bool = True  # random first-block offset per sample, as the reference code does
    resume: str = "auto"  # auto | none | a checkpoint folder
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    fast_loss: bool = True  # LM head + loss in row chunks, never the full logits (false: the plain path)
    compile: bool = False  # torch.compile the model, ids to final states, and the chunk loss (compiling.apply_compile)
    compile_tuning: bool = False  # with compile: inductor tunes its GPU kernels' block sizes (minutes more compilation)
    distill: DistillSection = field(default_factory=DistillSection)  # distillation from a frozen teacher
    align: AlignSection = field(default_factory=AlignSection)  # the alignment stage

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return -(-self.max_tokens // (self.global_batch_size * self.seq_len))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_value(key: str, value, kind):
    """`value` converted to the annotated `kind`, or a UserError naming the key."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(option for option in options if option is not type(None))
        origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise UserError(f"recipe key '{key}' must be a mapping, got {value!r}")
        return _build(kind, value, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"recipe key '{key}' must be a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"recipe key '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(f"unknown recipe key '{prefix}{key}'")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"recipe key '{prefix}{missing[0]}' is required")
    return cls(**{key: _check_value(prefix + key, value, hints[key]) for key, value in values.items()})


def apply_override(values: dict, override: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to the raw recipe dict in place."""
    if "=" not in override:
        raise UserError(f"override {override!r} is not key=value")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise UserError(f"recipe key '{key}' goes through a value that is not a mapping")
    target[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def validate(recipe: Recipe) -> Recipe:
    """Checks across keys that types alone cannot express."""
    if recipe.precision not in PRECISIONS:
        raise UserError(f"recipe key 'precision' must be one of {', '.join(PRECISIONS)}, got {recipe.precision!r}")
    if recipe.architecture not in ARCHITECTURES:
        raise UserError(
            f"recipe key 'architecture' must be one of {', '.join(ARCHITECTURES)}, got {recipe.architecture!r}"
        )
    if recipe.tracker not in TRACKERS:
        raise UserError(f"recipe key 'tracker' must be one of {', '.join(TRACKERS)}, got {recipe.tracker!r}")
    if (recipe.max_steps is None) == (recipe.max_tokens is None):
        raise UserError("give exactly one of recipe keys 'max_steps' and 'max_tokens'")
    if recipe.global_batch_size % recipe.micro_batch_size:
        raise UserError("recipe key 'global_batch_size' must be a multiple of 'micro_batch_size'")
    if len(recipe.betas) != 2:
        raise UserError("recipe key 'betas' must have two values")
    for key in ("seq_len", "micro_batch_size", "global_batch_size", "eval_every", "save_every", "log_every"):
        if getattr(recipe, key) < 1:
            raise UserError(f"recipe key '{key}' must be at least 1")
    validate_convert(recipe.convert)
    validate_distill(recipe.distill)
    validate_align(recipe)
    return recipe


def one_of(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"recipe key '{key}' must be one of {', '.join(choices)}, got {value!r}")


def validate_convert(section: ConvertSection) -> None:
    from .convert import BLOCK_NORMS, METHODS, SINKS  # the choices `uptrain convert` offers

    one_of("convert.method", section.method, METHODS)
    one_of("convert.sink", section.sink, SINKS)
    one_of("convert.block_norm", section.block_norm, BLOCK_NORMS)
    for key in ("block_length", "prefix_length"):
        if getattr(section, key) < 1:
            raise UserError(f"recipe key 'convert.{key}' must be at least 1")
    if section.block_layers is not None and section.block_layers < 1:
        raise UserError("recipe key 'convert.block_layers' must be at least 1")
    if section.token_input_layers is not None and section.token_input_layers < 0:
        raise UserError("recipe key 'convert.token_input_layers' must be 0 or more")


def validate_distill(section: DistillSection) -> None:
    if section.hidden_weight < 0:
        raise UserError(f"recipe key 'distill.hidden_weight' must be 0 or more, got {section.hidden_weight}")
    if section.hidden_weight > 0 and not section.enabled:
        raise UserError("recipe key 'distill.hidden_weight' needs distill.enabled: true (the teacher's final states)")


def validate_align(recipe: Recipe) -> None:
    """The stage's own keys, and what it needs of the run (checks that need the model: `alignment.check_model`)."""
    align = recipe.align
    one_of("align.loss", align.loss, ALIGN_LOSSES)
    if align.steps < 0:
        raise UserError(f"recipe key 'align.steps' must be 0 or more, got {align.steps}")
    if align.steps == 0:
        return
    if align.steps > recipe.total_steps():
        raise UserError(
            f"recipe key 'align.steps' ({align.steps}) is longer than the run ({recipe.total_steps()} steps)"
        )
    if align.lr <= 0 or recipe.lr <= 0:
        raise UserError("recipe keys 'align.lr' and 'lr' must be positive with an align stage")
    if recipe.architecture != "block" or recipe.from_scratch:
        raise UserError(
            "the align stage needs a converted Block Transformer (architecture: block, from_scratch: false)"
        )
    from .architectures import is_block_folder

    if not is_block_folder(recipe.source) and recipe.convert.method != "partition":
        raise UserError(
            f"the align stage needs convert.method partition, got {recipe.convert.method!r}: only there "
            "is the block decoder's output the source's state after its first K layers"
        )


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} must be a mapping of keys to values")
    for override in overrides:
        apply_override(values, override)
    return validate(_build(Recipe, values))


def dump_recipe(recipe: Recipe, public: bool = False) -> str:
    """The recipe as YAML; `public`: as published beside a model, local paths cut to their last component."""
    return yaml.safe_dump(public_recipe(recipe) if public else recipe.to_dict(), sort_keys=False)


def public_recipe(recipe: Recipe) -> dict:
    """The recipe's values with every local path (source, data, output folder, resume point, teacher) reduced
    to its name; hub ids and keywords (`default`, `auto`, `none`) stay as they are."""
    from .sources import public_spec

    values = recipe.to_dict()
    for key in ("source", "data", "output_dir", "resume"):
        values[key] = public_spec(values[key])
    values["distill"]["teacher"] = public_spec(values["distill"]["teacher"])
    return values
