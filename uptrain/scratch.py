"""Random weights for training from scratch: transformers' initialisation, with every padding row trainable.

transformers initialises the embedding row of `pad_token_id` to zero, and `nn.Embedding(padding_idx=...)`
never updates it. In packed training data the pad id is often the end-of-text token (SmolLM2: both 2), a
real token. A sequence that starts with it gives position 0 a hidden state of exactly zero in every layer:
attending only to itself returns its own zero value, and the MLP of zero is zero. The backward pass of each
RMSNorm at a zero input multiplies the gradient by 1/sqrt(eps) (316 at eps 1e-5), so over SmolLM2-135M's 30
layers that position's gradient overflows and every weight's gradient becomes NaN, in float32 too: a vanilla
run from random weights stops at its first such sequence. From scratch, that row is drawn like the others and
trained like the others. (A pretrained model's padding row holds trained values and keeps transformers'
behaviour.)
"""

import torch
from torch import nn


@torch.no_grad()
def train_padding_rows(model: nn.Module) -> list[str]:
    """Give each embedding's all-zero padding row random values at the scale of the other rows and let it
    train (`padding_idx` None). Returns the embeddings' names (tied embeddings are one module)."""
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or module.padding_idx is None:
            continue
        row = module.weight[module.padding_idx]  # (D,)
        if not row.any():
            others = torch.cat([module.weight[: module.padding_idx], module.weight[module.padding_idx + 1 :]])
            row.normal_(0.0, float(others.float().std()))
        module.padding_idx = None
        changed.append(name)
    return changed
