"""Vanilla causal LM -> Block Transformer (docs/concepts.md, "From a pretrained model: conversion").

The source is loaded with transformers (which knows every checkpoint layout, GGUF included); the target
is built on the meta device only to learn its tensor names, and each target tensor is then taken from the
source (or from the paper's initialisation) and streamed into safetensors shards.
"""

import copy
import datetime
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .architectures import decoder_config, embedding_stage, final_norm, layer_list_name
from .card import model_card
from .configuration_block_transformer import BlockTransformerConfig
from .errors import UserError
from .export import check_target, staged_folder, untied_names, write_model_folder
from .modeling_block_transformer import BlockTransformerForCausalLM, final_norm_name, initial_weights
from .records import CONVERSION
from .sources import (
    DTYPES,
    Source,
    card_metadata,
    fingerprint,
    load_config,
    load_model,
    load_tokenizer,
    require_gguf,
    resolve,
)

METHODS = ("partition", "skip", "duplicate")
SINKS = ("none", "source")
BLOCK_NORMS = ("none", "fresh", "source")
# Source layers copied to the head of the token decoder by default (docs/results/recovery-cpu.md measures it).
AUTO_TOKEN_INPUT_LAYERS = 2
# Command-line spelling of each option, for error messages.
FLAGS = {
    "block_length": "--block-length", "block_layers": "--block-layers", "method": "--method",
    "prefix_length": "--prefix-length", "dtype": "--dtype", "token_input_layers": "--token-input-layers",
    "sink": "--sink", "block_norm": "--block-norm",
}
CHOICES = {"method": METHODS, "dtype": ("auto", *DTYPES), "sink": SINKS, "block_norm": BLOCK_NORMS}


@dataclass
class ConvertOptions:
    """How a source model becomes a Block Transformer. `validate()` (run on construction) refuses an unknown
    value or a wrong type; what depends on the source (layer counts, its special tokens) is checked by
    `convert` before anything is written.

    block_length, block_layers, method, prefix_length, dtype: L_B, K (default n // 2), the layer method, r
    and the weights' dtype (docs/guides/convert.md).

    token_input_layers (N): the token decoder also gets copies of the source's first N layers, before its own
    (partition, K = 15, N = 2: layers 0, 1, 15..29). Its own layers were trained on contextual layer-K states
    and would otherwise get raw token embeddings in the token slots; the copies turn those embeddings into
    the kind of input the next layers expect. Only a layer selection: the format, engines and generation are
    unchanged (`source_layers` in the config records it). N is at most the number of source layers below the
    token decoder's first layer (K for partition): a copy of a later layer would run that layer twice in
    the token decoder's path, or out of order. None (the default) is "auto": min(2, that number) when the
    token decoder has layers of its own, else 0, so that the identity conversion stays the identity
    (`resolved` makes it explicit; conversion.json records the number).

    sink ("none" | "source"): one more prefix slot at the head of every token-decoder window, constant at
    init: its expansion rows are zero and its bias is the source's residual state after K layers (like
    `start_context`) of one token at position 0; trainable afterwards. Attention heads park their weight on
    such a state (the StreamingLLM attention sink), and the window otherwise has none. The token is the
    source's EOS token: packed training data (`uptrain data prepare`) puts it after every document, so it
    is what the model sees before each document starts (and, in chat models, what ends every turn), and
    every tokenizer the data tools accept has one; without an EOS token, BOS. The config's prefix_length
    is then r + 1 (slot 0 the sink); `prefix_length` here stays the user's r. No format change.

    block_norm ("none" | "fresh" | "source"): "none" drops the block decoder's final norm, so its output is a
    residual-stream state like the source's layer-K state. The reference code keeps its base model's final
    norm there, started fresh and trained: "fresh" keeps it with the architecture's own initialisation
    (weight 1, bias 0; Gemma's 1 + w norms weight 0), "source" copies the source's final norm. The config
    records it (`block_decoder_norm`; absent in older configs, which keep loading unchanged), and
    `start_context` is normed like the block decoder's outputs.

    The defaults (token_input_layers auto, sink "source", block_norm "none") reach a lower held-out loss than
    the paper's plain conversion (token_input_layers 0, sink "none") when uptrained on the same tokens:
    docs/results/recovery-cpu.md.

    Identity invariant (contract 4: L_B 1, all layers in the block decoder, partition): the defaults keep it
    exactly (auto token_input_layers is 0 there). The sink keeps it exactly,
    since the token decoder has no layers there and nothing attends to the slot. block_norm "fresh" keeps it
    up to the norm's epsilon: a unit-weight norm maps the state to unit scale and the token decoder's final
    norm maps that to what it maps the state itself to, save for a relative error of about eps / (2 x the
    state's mean square), which can exceed contract 4's 1e-4 on large logits. token_input_layers > 0 breaks
    it (the copies run over the context state a second time), and so does block_norm "source" (the source's
    norm weights are applied twice).
    """

    block_length: int = 4
    block_layers: int | None = None  # default: half the source layers
    method: str = "partition"
    prefix_length: int = 2
    dtype: str = "auto"
    token_input_layers: int | None = None  # None: auto (see above)
    sink: str = "source"
    block_norm: str = "none"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a one-line UserError for a value of the wrong type, out of range or not among the choices."""
        for field in fields(self):
            value, choices = getattr(self, field.name), CHOICES.get(field.name)
            if choices and (not isinstance(value, str) or value not in choices):
                name = field.name.replace("_", " ")
                raise UserError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
            whole = isinstance(value, int) and not isinstance(value, bool)
            automatic = field.name in ("block_layers", "token_input_layers") and value is None
            if not choices and not whole and not automatic:
                raise UserError(f"{FLAGS[field.name]} must be a whole number, got {value!r}")
        if self.block_length < 1 or self.prefix_length < 1:
            raise UserError("--block-length and --prefix-length must be at least 1")
        if self.token_input_layers is not None and self.token_input_layers < 0:
            raise UserError(f"--token-input-layers must be 0 or more, got {self.token_input_layers}")


def resolved(options: ConvertOptions, total: int) -> ConvertOptions:
    """`options` with its automatic values made explicit for a source of `total` layers: block_layers n // 2, and
    token_input_layers min(2, the source layers below the token decoder's first own layer), 0 when the token
    decoder has no layers of its own (an identity conversion) or none lie below them (duplicate)."""
    block_layers = options.block_layers if options.block_layers is not None else total // 2
    token_input_layers = options.token_input_layers
    if token_input_layers is None:
        own = select_layers(total, block_layers, options.method)["token_decoder"]
        token_input_layers = min(AUTO_TOKEN_INPUT_LAYERS, own[0]) if own else 0
    return replace(options, block_layers=block_layers, token_input_layers=token_input_layers)


def select_layers(total: int, block_layers: int, method: str, token_input_layers: int = 0) -> dict[str, list[int]]:
    """Source layer indices for each decoder.

    partition: block <- [0, K), token <- [K, n). skip: block <- K layers spread evenly (every other one for
    K = n/2), token <- the rest. duplicate: both <- the same K layers spread evenly (K = n: all of them).
    token_input_layers N puts the source's layers [0, N) at the head of the token decoder.
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not 1 <= block_layers <= total:
        raise UserError(f"--block-layers must be between 1 and {total} (the source's layer count), got {block_layers}")
    if method == "partition":
        layers = {"block_decoder": list(range(block_layers)), "token_decoder": list(range(block_layers, total))}
    else:
        spread = sorted({round(i * total / block_layers) for i in range(block_layers)})
        token = [i for i in range(total) if i not in spread] if method == "skip" else list(spread)
        layers = {"block_decoder": spread, "token_decoder": token}
    below = layers["token_decoder"][0] if layers["token_decoder"] else total
    if token_input_layers > below:
        raise UserError(
            f"--token-input-layers {token_input_layers} is more than the {below} source layers below the token "
            f"decoder's first layer (method {method}, --block-layers {block_layers})"
        )
    layers["token_decoder"] = list(range(token_input_layers)) + layers["token_decoder"]
    return layers


def check_supported(config) -> None:
    """Decoder-only causal LMs with a flat layer stack and a final norm; anything else is named and refused."""
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False) or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"unsupported model {kind!r}: block-uptrain converts decoder-only causal language models")
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    try:
        final_norm(base)
    except ValueError:
        raise UserError(f"unsupported model {kind!r}: not a decoder-only stack with a final norm") from None
    layer_list_name(base)


def build_config(source_config, options: ConvertOptions, dtype: torch.dtype) -> BlockTransformerConfig:
    options.validate()
    total = source_config.num_hidden_layers
    options = resolved(options, total)
    layers = select_layers(total, options.block_layers, options.method, options.token_input_layers)
    decoders = {name: decoder_config(source_config, indices) for name, indices in layers.items()}
    for sub in decoders.values():
        sub["dtype"] = str(dtype).removeprefix("torch.")
    return BlockTransformerConfig(
        block_decoder=decoders["block_decoder"],
        token_decoder=decoders["token_decoder"],
        block_length=options.block_length,
        prefix_length=options.prefix_length + (options.sink != "none"),  # the sink is prefix slot 0
        source_layers=layers,
        embedding_stage=embedding_stage(source_config),
        block_decoder_norm=options.block_norm != "none",
        dtype=str(dtype).removeprefix("torch."),
    )


def target_tensors(source: nn.Module, target: nn.Module, config: BlockTransformerConfig, own: dict[str, torch.Tensor]):
    """Yield (target name, tensor) for every tensor the saved model needs, tied copies excluded: `own` holds
    those that are not the source's (`own_tensors`), every other one is copied from its source layer."""
    prefix = source.base_model_prefix
    layers_name = layer_list_name(source.base_model)
    source_state = source.state_dict()
    layer_key = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.(.*)$")

    def from_source(rest: str, indices: list[int]) -> torch.Tensor:
        match = layer_key.match(rest)
        if match:
            rest = f"{layers_name}.{indices[int(match.group(1))]}.{match.group(2)}"
        return source_state[f"{prefix}.{rest}"]

    dtype = next(source.parameters()).dtype
    for name in untied_names(target):
        part, _, rest = name.partition(".")
        if name in own:
            yield name, own[name].to(dtype)
        elif part == "block_decoder":
            yield name, from_source(rest, config.source_layers["block_decoder"])
        elif part == "token_decoder" and rest.startswith(prefix + "."):
            yield name, from_source(rest[len(prefix) + 1 :], config.source_layers["token_decoder"])
        else:
            yield name, source_state[rest]


def own_tensors(source: nn.Module, config: BlockTransformerConfig, options: ConvertOptions, sink: int | None):
    """The saved tensors that are not copies of source tensors: the paper's embedder and expansion init, the
    start context, the sink slot and a fresh block-decoder norm."""
    block_layers = len(config.source_layers["block_decoder"])
    dim = config.block_decoder.hidden_size
    own = initial_weights(dim, config.block_length, config.prefix_length)
    norm = block_norm(source, options.block_norm)
    start = source_start_context(source, block_layers)
    own["start_context"] = start if norm is None else norm(start)
    if options.block_norm == "fresh":
        name = final_norm_name(source.base_model)
        own.update({f"block_decoder.{name}.{key}": value for key, value in norm.state_dict().items()})
    if options.sink != "none":  # slot 0: weight 0, bias the sink state, whatever the context
        own["expansion.weight"][:dim] = 0
        own["expansion.bias"][:dim] = residual_state(source, sink, block_layers)
    return own


def block_norm(source: nn.Module, kind: str) -> nn.Module | None:
    """The block decoder's final norm at init: None ("none"), the source's own ("source"), or a copy of it with
    the architecture's initialisation ("fresh", as a model built from scratch gets it)."""
    if kind == "none":
        return None
    norm = final_norm(source.base_model)
    if kind == "source":
        return norm
    fresh = copy.deepcopy(norm)
    for tensor in [*fresh.parameters(), *fresh.buffers()]:
        tensor.__dict__.pop("_is_hf_initialized", None)  # a loaded tensor's flag makes transformers skip it
    source.base_model._init_weights(fresh)
    return fresh


def sink_token(tokenizer, source_config) -> int:
    """The token whose state fills the sink slot: EOS (packed training data puts it after every document, so
    before the next), else BOS, as the tokenizer or else the config states it; a UserError when neither is."""
    vocab = source_config.vocab_size
    for attribute in ("eos_token_id", "bos_token_id"):
        for owner in (tokenizer, source_config):
            value = getattr(owner, attribute, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and 0 <= value < vocab:
                return value
    raise UserError(
        "--sink source needs an EOS or BOS token, and the source's tokenizer and config declare neither: "
        "convert with --sink none"
    )


@torch.no_grad()
def residual_state(source: nn.Module, token: int, layers: int) -> torch.Tensor:
    """(D,) residual-stream state of the source after `layers` layers at position 0 of a sequence starting
    with `token` (before the final norm, also when `layers` is all of them)."""
    base = source.base_model
    captured = {}
    norm = final_norm(base)
    hook = norm.register_forward_pre_hook(lambda module, args: captured.setdefault("pre_norm", args[0]))
    try:
        output = base(input_ids=torch.tensor([[token]]), output_hidden_states=True)
    finally:
        hook.remove()
    state = captured["pre_norm"] if layers == source.config.num_hidden_layers else output.hidden_states[layers]
    return state[0, 0].clone()


def source_start_context(source: nn.Module, block_layers: int) -> torch.Tensor:
    """Context for the first block: the source's residual state after `block_layers` layers on the BOS token.

    With the partition split this is exactly what the block decoder outputs for a block of BOS tokens, so the
    first block of every sequence starts as if a BOS block preceded it. Zeros when there is no BOS token.
    """
    bos = source.config.bos_token_id
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if bos is None:
        return torch.zeros(source.config.hidden_size, dtype=next(source.parameters()).dtype)
    return residual_state(source, bos, block_layers)


def convert(
    spec: str, out: Path, options: ConvertOptions, gguf_file: str | None = None, overwrite: bool = False
) -> Path:
    """Convert SOURCE into a Block Transformer folder at OUT; returns OUT."""
    out = Path(out)
    check_target(out, overwrite)
    options.validate()
    source_ref = resolve(spec, gguf_file)
    require_gguf(source_ref)
    tokenizer = None
    if not source_ref.gguf_file:  # reading a GGUF header costs as much as the model: check after loading
        source_config = load_config(source_ref)
        check_supported(source_config)
        build_config(source_config, options, torch.float32)  # validate options before the slow load
        if options.sink != "none":
            tokenizer = load_tokenizer(source_ref)
            sink_token(tokenizer, source_config)

    source = load_model(source_ref, options.dtype).eval()
    check_supported(source.config)
    options = resolved(options, source.config.num_hidden_layers)  # what conversion.json and the card record
    dtype = next(source.parameters()).dtype
    config = build_config(source.config, options, dtype)
    with torch.device("meta"):
        target = BlockTransformerForCausalLM(config)
    if tokenizer is None:
        tokenizer = load_tokenizer(source_ref)
    sink = sink_token(tokenizer, source.config) if options.sink != "none" else None
    own = own_tensors(source, config, options, sink)
    generation_config = getattr(source, "generation_config", None)
    record = conversion_record(source_ref, options, config)
    if sink is not None:
        record["sink_token"] = {"id": sink, "text": tokenizer.convert_ids_to_tokens(sink) if tokenizer else None}
    with staged_folder(out, overwrite) as folder:
        write_model_folder(
            folder,
            config,
            target_tensors(source, target, config, own),
            total=len(untied_names(target)),
            tokenizer=tokenizer,
            generation_config=generation_config,
            card=model_card(config.to_dict(), record),
            records={CONVERSION: record},
        )
    return out


def conversion_record(source: Source, options: ConvertOptions, config: BlockTransformerConfig) -> dict:
    import transformers

    return {
        "source": source.public_name,  # never a local path: the record is published with the model
        "source_fingerprint": fingerprint(source),
        **card_metadata(source),
        "source_model_type": config.token_decoder.model_type,
        "options": asdict(options),
        "source_layers": config.source_layers,
        "toolkit": {"block-uptrain": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
