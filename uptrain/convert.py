"""Vanilla causal LM -> Block Transformer (DESIGN.md §1, "Uptraining from a vanilla model").

The source is loaded with transformers (which knows every checkpoint layout, GGUF included); the target
is built on the meta device only to learn its tensor names, and each target tensor is then taken from the
source (or from the paper's initialisation) and streamed into safetensors shards.
"""

import datetime
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .architectures import decoder_config, embedding_stage, final_norm, layer_list_name
from .card import model_card
from .configuration_block_transformer import BlockTransformerConfig
from .errors import UserError
from .export import check_target, staged_folder, untied_names, write_model_folder
from .modeling_block_transformer import BlockTransformerForCausalLM, initial_weights
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


@dataclass
class ConvertOptions:
    block_length: int = 4
    block_layers: int | None = None  # default: half the source layers
    method: str = "partition"
    prefix_length: int = 2
    dtype: str = "auto"


def select_layers(total: int, block_layers: int, method: str) -> dict[str, list[int]]:
    """Source layer indices for each decoder.

    partition: block <- [0, K), token <- [K, n). skip: block <- K layers spread evenly (every other one for
    K = n/2), token <- the rest. duplicate: both <- the same K layers spread evenly (K = n: all of them).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not 1 <= block_layers <= total:
        raise UserError(f"--block-layers must be between 1 and {total} (the source's layer count), got {block_layers}")
    if method == "partition":
        return {"block_decoder": list(range(block_layers)), "token_decoder": list(range(block_layers, total))}
    spread = sorted({round(i * total / block_layers) for i in range(block_layers)})
    if method == "skip":
        return {"block_decoder": spread, "token_decoder": [i for i in range(total) if i not in spread]}
    return {"block_decoder": spread, "token_decoder": list(spread)}


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
    if options.block_length < 1 or options.prefix_length < 1:
        raise UserError("--block-length and --prefix-length must be at least 1")
    total = source_config.num_hidden_layers
    block_layers = options.block_layers if options.block_layers is not None else total // 2
    layers = select_layers(total, block_layers, options.method)
    decoders = {name: decoder_config(source_config, indices) for name, indices in layers.items()}
    for sub in decoders.values():
        sub["dtype"] = str(dtype).removeprefix("torch.")
    return BlockTransformerConfig(
        block_decoder=decoders["block_decoder"],
        token_decoder=decoders["token_decoder"],
        block_length=options.block_length,
        prefix_length=options.prefix_length,
        source_layers=layers,
        embedding_stage=embedding_stage(source_config),
        dtype=str(dtype).removeprefix("torch."),
    )


def target_tensors(source: nn.Module, target: nn.Module, config: BlockTransformerConfig, start_context: torch.Tensor):
    """Yield (target name, tensor) for every tensor the saved model needs, tied copies excluded."""
    prefix = source.base_model_prefix
    layers_name = layer_list_name(source.base_model)
    source_state = source.state_dict()
    dim = config.block_decoder.hidden_size
    ours = initial_weights(dim, config.block_length, config.prefix_length)
    ours["start_context"] = start_context
    layer_key = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.(.*)$")

    def from_source(rest: str, indices: list[int]) -> torch.Tensor:
        match = layer_key.match(rest)
        if match:
            rest = f"{layers_name}.{indices[int(match.group(1))]}.{match.group(2)}"
        return source_state[f"{prefix}.{rest}"]

    dtype = next(source.parameters()).dtype
    for name in untied_names(target):
        part, _, rest = name.partition(".")
        if part == "block_decoder":
            yield name, from_source(rest, config.source_layers["block_decoder"])
        elif part == "token_decoder" and rest.startswith(prefix + "."):
            yield name, from_source(rest[len(prefix) + 1 :], config.source_layers["token_decoder"])
        elif part == "token_decoder":
            yield name, source_state[rest]
        else:
            yield name, ours[name].to(dtype)


@torch.no_grad()
def source_start_context(source: nn.Module, block_layers: int) -> torch.Tensor:
    """Context for the first block: the source's residual state after `block_layers` layers on the BOS token.

    With the partition split this is exactly what the block decoder outputs for a block of BOS tokens, so the
    first block of every sequence starts as if a BOS block preceded it. Zeros when there is no BOS token.
    """
    dim = source.config.hidden_size
    bos = source.config.bos_token_id
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if bos is None:
        return torch.zeros(dim, dtype=next(source.parameters()).dtype)
    base = source.base_model
    captured = {}
    norm = final_norm(base)
    hook = norm.register_forward_pre_hook(lambda module, args: captured.setdefault("pre_norm", args[0]))
    try:
        output = base(input_ids=torch.tensor([[bos]]), output_hidden_states=True)
    finally:
        hook.remove()
    total = source.config.num_hidden_layers
    state = captured["pre_norm"] if block_layers == total else output.hidden_states[block_layers]
    return state[0, 0].clone()


def convert(
    spec: str, out: Path, options: ConvertOptions, gguf_file: str | None = None, overwrite: bool = False
) -> Path:
    """Convert SOURCE into a Block Transformer folder at OUT; returns OUT."""
    out = Path(out)
    check_target(out, overwrite)
    if options.dtype not in ("auto", *DTYPES):
        raise UserError(f"unknown dtype {options.dtype!r}: choose auto, {', '.join(DTYPES)}")
    source_ref = resolve(spec, gguf_file)
    require_gguf(source_ref)
    if not source_ref.gguf_file:  # reading a GGUF header costs as much as the model: check after loading
        source_config = load_config(source_ref)
        check_supported(source_config)
        build_config(source_config, options, torch.float32)  # validate options before the slow load

    source = load_model(source_ref, options.dtype).eval()
    check_supported(source.config)
    dtype = next(source.parameters()).dtype
    config = build_config(source.config, options, dtype)
    with torch.device("meta"):
        target = BlockTransformerForCausalLM(config)
    start_context = source_start_context(source, len(config.source_layers["block_decoder"]))
    tokenizer = load_tokenizer(source_ref)
    generation_config = getattr(source, "generation_config", None)
    record = conversion_record(source_ref, options, config)
    with staged_folder(out, overwrite) as folder:
        write_model_folder(
            folder,
            config,
            target_tensors(source, target, config, start_context),
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
