"""Token-decoder attention for training: a window of r + L - 1 positions, written for the compiler.

A Block Transformer's token decoder attends within windows of r + L - 1 positions (5 by default), tens of
thousands of windows a micro-batch. SDPA's kernels are built for long sequences and batched matmuls for
larger matrices; written as broadcast products and sums, a compiled decoder fuses the attention into a few
kernels (docs/results/training-throughput.md has the measurements). `compiling.apply_compile` switches it on.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import is_block_model

WINDOW_ATTENTION = "block_window"


def window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Attention as broadcast products and sums, in float32; transformers' attention-function signature.

    query (B, H, T, d), key and value (B, Hkv, S, d), attention_mask (B, 1, T, S) boolean (True: attend)
    or None (causal) -> ((B, T, H, d), None)."""
    batch, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    q = query.float().view(batch, kv_heads, heads // kv_heads, length, 1, head_dim)  # (B, Hkv, G, T, 1, d)
    scores = (q * key.float()[:, :, None, None]).sum(-1) * (head_dim**-0.5 if scaling is None else scaling)
    if softcap is not None:  # (B, Hkv, G, T, S)
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        keep = torch.ones(length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - length)
    else:
        keep = attention_mask[:, :, None]  # (B, 1, 1, T, S)
    probs = F.dropout(scores.masked_fill(~keep, float("-inf")).softmax(-1), p=dropout, training=module.training)
    out = (probs[..., None] * value.float()[:, :, None, None]).sum(-2)  # (B, Hkv, G, T, d)
    return out.to(query.dtype).reshape(batch, heads, length, head_dim).transpose(1, 2).contiguous(), None


def use_window_attention(model: nn.Module) -> None:
    """The token decoder of a block model attends with `window_attention` (a training-time choice: the
    saved config keeps its own implementation). The block decoder, over T / L positions, keeps its own."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(WINDOW_ATTENTION, window_attention)
    AttentionMaskInterface.register(WINDOW_ATTENTION, sdpa_mask)  # boolean masks, None when plainly causal
    if is_block_model(model):
        model.token_decoder.set_attn_implementation(WINDOW_ATTENTION)
