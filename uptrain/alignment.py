"""The alignment stage: the block decoder learns to hand the token decoder the prefix vectors the source would.

A converted token decoder holds the source's upper layers, trained on the source's residual states after its
first K layers. The paper's conversion feeds them prefix vectors `expansion(context)` that at init are only
roughly such states (docs/concepts.md, "From a pretrained model: conversion"). The stage trains the parts that
make the prefix (embedder projection, expansion, start context, the block decoder's layers and its optional
final norm) to match the frozen source's states, before end-to-end training; everything else keeps its weights
(`trained_parameters`).

Targets: block j (tokens jL .. jL+L-1) has prefix slots i = 1..r; slot i targets the source's state after K
layers (the state entering source layer K) at token jL - r + i - 1, so the r slots stand for the r tokens just
before the block. Blocks without r tokens before them are not scored; the block after the sequence's last is,
since its prefix comes from the block decoder's last output and its targets are the sequence's last r tokens.
With a sink (`convert --sink source`) the prefix has r + 1 slots and slot 0, the sink, has no target.

Both sides are residual-stream states: the prefix before the token decoder's inverse embedding stage
(`prefix_states`), the source's state with whatever its embedding stage added (GPT-2's positions included).
This needs the partition method, where the block decoder holds the source's layers [0, K) and the token
decoder continues from layer K; with skip or duplicate no source state is what the token decoder expects.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import decoder_config, final_norm, is_block_folder, layers_of
from .errors import UserError
from .modeling_block_transformer import final_norm_name
from .records import CONVERSION, read_json

NORM_FLOOR = 1e-12  # squared norm below which a target vector counts as zero (relative MSE's denominator)


def relative_mse(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over vectors (the last dimension) of ||p - h||^2 / ||h||^2.

    Scale-free per vector: residual-stream norms vary by orders of magnitude across positions (attention-sink
    positions carry huge ones), and a plain MSE would be dominated by the few largest. Unlike the cosine it
    also pins each vector's norm, and the token decoder's layers read the norm as well as the direction: a
    layer adds its update to the residual it is given, so a prefix of the wrong scale changes the balance
    between the two. Hence the default."""
    error = (predicted - target).pow(2).sum(-1)
    return (error / target.pow(2).sum(-1).clamp(min=NORM_FLOOR)).mean()


def cosine_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over vectors of 1 - cos(p, h): the direction alone, each vector's norm left free."""
    return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()


LOSSES = {"relative_mse": relative_mse, "cosine": cosine_distance}


def target_tokens(blocks: int, block_length: int, prefix_slots: int) -> tuple[int, torch.Tensor]:
    """(first scored block, token indices (S, r)) for a sequence of `blocks` blocks: row s holds the tokens that
    prefix slots 1..r of block first+s target, for blocks first .. blocks (the last one past the sequence's end).
    Block j is scored when j*L >= r."""
    first = math.ceil(prefix_slots / block_length)
    scored = torch.arange(first, blocks + 1)  # (S,)
    return first, scored[:, None] * block_length - prefix_slots + torch.arange(prefix_slots)  # (S, r)


def partition_split(source_layers: dict) -> int | None:
    """K when a Block Transformer's layers are the partition method's (block decoder = source layers [0, K), the
    token decoder's own layers continuing from K, after any copies of the first layers), else None."""
    block, token = source_layers["block_decoder"], source_layers["token_decoder"]
    k = len(block)
    if block != list(range(k)):
        return None
    copies = len(token) - len([i for i in token if i >= k])
    return k if token == list(range(copies)) + list(range(k, k + len(token) - copies)) else None


def model_layout(recipe) -> tuple[dict, dict]:
    """(block config values, conversion options) of the model a recipe trains, read before it is built: a converted
    folder's config.json and conversion.json, or the recipe's `convert:` section."""
    if not is_block_folder(recipe.source):
        section = recipe.convert
        return {"block_length": section.block_length, "prefix_length": section.prefix_length + (section.sink != "none"),
                "source_layers": None}, {"sink": section.sink}
    folder = Path(recipe.source)
    record = read_json(folder / CONVERSION)
    if record is None:
        raise UserError(f"the align stage needs {folder / CONVERSION}: the conversion record says whether prefix "
                        "slot 0 is a sink")
    return json.loads((folder / "config.json").read_text()), record.get("options", {})


def sink_slots(options: dict) -> int:
    """Prefix slots before the aligned ones: 1 with a sink (`convert --sink`), else 0."""
    return int(options.get("sink", "none") != "none")


def check_recipe(recipe) -> None:
    """Refusals that need the model's layout (the recipe's own keys: `recipe.validate_align`), before any work."""
    config, options = model_layout(recipe)
    layers = config["source_layers"]
    if layers is not None and partition_split(layers) is None:
        raise UserError(f"the align stage needs a model converted with the partition method; {recipe.source} has "
                        f"block decoder layers {layers['block_decoder']} and token decoder layers "
                        f"{layers['token_decoder']}")
    block_length, slots = config["block_length"], config["prefix_length"] - sink_slots(options)
    if target_tokens(recipe.seq_len // block_length, block_length, slots)[1].numel() == 0:
        raise UserError(f"seq_len {recipe.seq_len} leaves no block with {slots} tokens before it to align")


class PrefixAlignment:
    """The stage's loss: `(model, ids (B, T)) -> scalar`, the prefix vectors of every scored block against the
    frozen `source` (`source_stack`) states at their target tokens."""

    def __init__(self, source: nn.Module, sink_slots: int, loss: str = "relative_mse"):
        self.source = source
        self.sink_slots = sink_slots
        self.loss = LOSSES[loss]

    def source_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) the source's states after K layers, without gradients."""
        with torch.no_grad():
            return self.source(input_ids=ids, use_cache=False).last_hidden_state

    def __call__(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        block_length = model.config.block_length
        slots = model.config.prefix_length - self.sink_slots
        first, tokens = target_tokens(length // block_length, block_length, slots)
        contexts = model.block_contexts(ids, None, past_end=True)[:, first:]  # (B, S, D)
        prefix = model.prefix_states(contexts)[:, :, self.sink_slots :]  # (B, S, r, D)
        targets = self.source_states(ids)[:, tokens.to(ids.device)]  # (B, S, r, D)
        return self.loss(prefix.float(), targets.float())


def source_stack(source: nn.Module, layers: int, hidden_size: int) -> nn.Module:
    """The source's embeddings and first `layers` layers as a frozen base model of its own class, whose output is
    the residual state entering layer `layers` (its final norm replaced by identity); the other layers are not
    kept, so they never run."""
    from transformers import AutoConfig, AutoModel

    config = source.config
    if config.hidden_size != hidden_size or config.num_hidden_layers < layers:
        raise UserError(f"the align stage's source has hidden size {config.hidden_size} and {config.num_hidden_layers} "
                        f"layers; the model needs hidden size {hidden_size} and at least {layers} layers (the source "
                        "is the recipe's source, distill.teacher, or the model's conversion source)")
    values = decoder_config(config, list(range(layers)))
    truncated = AutoConfig.for_model(values.pop("model_type"), **values)
    truncated._attn_implementation = config._attn_implementation
    stack = AutoModel.from_config(truncated, dtype=next(source.parameters()).dtype)
    missing, _ = stack.load_state_dict(source.base_model.state_dict(), strict=False)  # layers >= K: left out
    if missing:
        raise UserError(f"the align stage cannot cut the source at layer {layers}: {missing[0]} is missing")
    setattr(stack, final_norm_name(stack), nn.Identity())
    return stack.eval().requires_grad_(False)


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the stage trains of a Block Transformer: embedder projection, expansion, start context, the block
    decoder's layers and its final norm when it has one. Its embedding table (and learned positions) and the
    token decoder keep their weights."""
    block_decoder = model.block_decoder
    parts = [model.embedder_projection, model.expansion, *layers_of(block_decoder), final_norm(block_decoder)]
    return [model.start_context, *(param for part in parts for param in part.parameters())]
