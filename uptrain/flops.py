"""Training FLOPs per token of a block or vanilla causal LM, and model FLOPs utilisation (MFU).

Convention (PaLM's, also torchtitan's): 6 FLOPs per matrix weight per token that passes through it (2 forward,
4 backward), plus 12 x width x context per layer and token for attention scores and values over the full
context (causal masking not subtracted). Embedding lookups and elementwise work are not counted.
docs/results/training-throughput.md reports MFU by it. For a Block Transformer with block length L, r prefix
vectors and W = r + L - 1 window positions, per token:

    6 x [ P_block / L                (block decoder: once per block)
        + L*D*D / L + r*D*D / L      (embedder projection, prefix expansion: once per block)
        + P_token x W / L            (token decoder: W window positions per L tokens)
        + V x D ]                    (LM head)
    + 12 x d_attn x [ l_block x (T/L) / L + l_token x W^2 / L ]

where P_* are the decoders' layer matrices, d_attn = heads x head_dim and T the sequence length. A vanilla
model is the case of one decoder over all T positions: 6 x (P + V x D) + 12 x d_attn x l x T.
"""

import torch
from torch import nn

from .architectures import decoder_layers, is_block_model, layers_of, output_head

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets, matched in order against
# torch.cuda.get_device_name(); a card not listed gets no MFU figure rather than a wrong one.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def matrix_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def attention_width(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def training_flops_per_token(model: nn.Module, seq_len: int) -> dict:
    """{"total": FLOPs per trained token, and its parts} for a block or vanilla causal LM."""
    weight, _, _ = output_head(model)
    vocab, dim = weight.shape
    parts = {"lm_head": 6 * vocab * dim}
    if not is_block_model(model):
        layers = decoder_layers(model)
        parts["layers"] = 6 * sum(matrix_params(layer) for layer in layers)
        parts["attention"] = 12 * attention_width(model.config) * len(layers) * seq_len
    else:
        config = model.config
        length, r = config.block_length, config.prefix_length
        window = r + length - 1
        block_layers, token_layers = layers_of(model.block_decoder), layers_of(model.token_decoder.base_model)
        block_params = sum(matrix_params(layer) for layer in block_layers)
        token_params = sum(matrix_params(layer) for layer in token_layers)
        parts["block_decoder"] = 6 * block_params / length
        new_matrices = matrix_params(model.embedder_projection) + matrix_params(model.expansion)
        parts["embedder_expansion"] = 6 * new_matrices / length
        parts["token_decoder"] = 6 * token_params * window / length
        parts["attention"] = 12 * (
            attention_width(config.block_decoder) * len(block_layers) * (seq_len / length) / length
            + attention_width(config.token_decoder) * len(token_layers) * window**2 / length
        )
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None where it is not known (CPUs, unlisted cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)
