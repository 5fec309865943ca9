"""What the toolkit knows about model anatomy: the source families' quirks kept as data, and the helpers
that find a model's parts (block or vanilla, decoder stacks and layers, output head, final norm).

Everything else is read off the source's own transformers classes: the decoder-layer list is the base
model's ModuleList with `num_hidden_layers` entries, the final norm is found by name
(`modeling_block_transformer.FINAL_NORM_NAMES`, kept in the shipped modeling file, which needs it too).
"""

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .modeling_block_transformer import final_norm_name

BLOCK_MODEL_TYPE = "block_transformer"  # `model_type` of every Block Transformer config

# Base models that change `inputs_embeds` before their first layer. `scale_from`: a config attribute the
# embeddings are multiplied by; `position_embedding`: a learned absolute position table that is added.
# (Gemma-style sqrt(D) scaling lives inside the embedding module in transformers 5, so it needs no entry.)
EMBEDDING_STAGES = {
    "gpt2": {"position_embedding": "wpe"},
    "gpt_bigcode": {"position_embedding": "wpe"},
    "granite": {"scale_from": "embedding_multiplier"},
    "granitemoe": {"scale_from": "embedding_multiplier"},
    "granitemoeshared": {"scale_from": "embedding_multiplier"},
    "granitemoehybrid": {"scale_from": "embedding_multiplier"},
}

# Config keys holding one entry per layer: sliced together with `num_hidden_layers`.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "layers_block_type")

# Config keys of the source that must not be carried into the decoders' configs.
DROPPED_CONFIG_KEYS = ("quantization_config", "architectures", "auto_map", "_name_or_path", "transformers_version")


def embedding_stage(config) -> dict:
    """The `embedding_stage` entry of a BlockTransformerConfig for a source config."""
    spec = EMBEDDING_STAGES.get(config.model_type, {})
    stage = {}
    if "scale_from" in spec:
        stage["scale"] = float(getattr(config, spec["scale_from"]))
    if "position_embedding" in spec:
        stage["position_embedding"] = spec["position_embedding"]
    return stage


def decoder_config(source_config, layers: list[int]) -> dict:
    """The source config as a dict, cut down to the given source layers."""
    config = source_config.to_dict()
    for key in DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    total = source_config.num_hidden_layers
    for key in PER_LAYER_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, (list, tuple)) and len(value) == total:
            config[key] = [value[i] for i in layers]
    config["num_hidden_layers"] = len(layers)
    return config


# What a causal LM does to `lm_head(hidden)` to get its logits, where it does more: (operation, config
# attribute). Losses that apply the head themselves (`chunked_loss`) need it; the trainer checks the result
# against the model's own logits once, so a family missing here is caught rather than trained wrongly.
LOGIT_TRANSFORMS = {
    "granite": ("divide", "logits_scaling"),
    "granitemoe": ("divide", "logits_scaling"),
    "granitemoeshared": ("divide", "logits_scaling"),
    "granitemoehybrid": ("divide", "logits_scaling"),
    "gemma2": ("softcap", "final_logit_softcapping"),
    "gemma3_text": ("softcap", "final_logit_softcapping"),
    "cohere": ("multiply", "logit_scale"),
    "cohere2": ("multiply", "logit_scale"),
    "falcon_h1": ("multiply", "lm_head_multiplier"),
}
LOGIT_OPERATIONS = {
    "divide": lambda logits, value: logits / value,
    "multiply": lambda logits, value: logits * value,
    "softcap": lambda logits, value: torch.tanh(logits / value) * value,
}


def logit_transform(config):
    """logits = logit_transform(config)(lm_head(hidden)) for a causal LM of this config."""
    operation, key = LOGIT_TRANSFORMS.get(config.model_type, (None, None))
    value = getattr(config, key, None) if key else None
    if value is None:
        return lambda logits: logits
    apply = LOGIT_OPERATIONS[operation]
    return lambda logits: apply(logits, value)


# -- a model's anatomy ----------------------------------------------------------------------------------------


def is_block_model(model: nn.Module) -> bool:
    """Whether a loaded model is a Block Transformer (by its config, as for a folder)."""
    return getattr(getattr(model, "config", None), "model_type", None) == BLOCK_MODEL_TYPE


def is_block_folder(spec: str | Path) -> bool:
    """Whether `spec` is a local folder holding a Block Transformer (its config.json says so)."""
    config = Path(spec) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == BLOCK_MODEL_TYPE


def output_head(model: nn.Module):
    """(weight (V, D), bias (V,) or None, logit transform) of a causal LM's head, block or vanilla."""
    lm = model.token_decoder if is_block_model(model) else model
    head = lm.get_output_embeddings()
    return head.weight, head.bias, logit_transform(lm.config)


def layer_list_name(base_model: nn.Module) -> str:
    """Name of a base model's decoder-layer list (`layers`, `h`, ...): its ModuleList of `num_hidden_layers`."""
    count = base_model.config.num_hidden_layers
    for name, child in base_model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return name
    raise UserError(f"unsupported model {base_model.config.model_type!r}: no list of {count} decoder layers found")


def final_norm(base_model: nn.Module) -> nn.Module:
    """A base model's final norm (the block decoder keeps it only with `block_decoder_norm` in its config)."""
    return getattr(base_model, final_norm_name(base_model))


def layers_of(base_model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers base model."""
    return list(getattr(base_model, layer_list_name(base_model)))


def decoder_stacks(model: nn.Module) -> list[nn.Module]:
    """The transformers base models (embeddings, layer stack, final norm) of a block or vanilla causal LM."""
    return [model.block_decoder, model.token_decoder.base_model] if is_block_model(model) else [model.base_model]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer of a block or vanilla causal LM, block decoder first."""
    return [layer for stack in decoder_stacks(model) for layer in layers_of(stack)]

