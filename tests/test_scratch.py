"""Random weights for training from scratch: the padding row that made a deep vanilla model's gradients NaN."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from uptrain.scratch import train_padding_rows

# SmolLM2's quirks at a small width: 30 layers, the pad id is the end-of-text id, a tied head
DEEP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


def gradients_of_a_sequence_starting_with_the_pad_id(model) -> dict:
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_a_trainable_padding_row_keeps_the_gradients_finite():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DEEP))
    assert not model.model.embed_tokens.weight[2].any()  # transformers' initialisation
    broken = gradients_of_a_sequence_starting_with_the_pad_id(model)
    assert not all(torch.isfinite(g).all() for g in broken.values())  # the failure is real at this depth

    assert train_padding_rows(model) == ["model.embed_tokens"]
    row = model.model.embed_tokens.weight[2].detach()
    others = model.model.embed_tokens.weight[3:].detach()
    assert 0.5 < float(row.std() / others.std()) < 2  # drawn at the scale of the other rows
    grads = gradients_of_a_sequence_starting_with_the_pad_id(model)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["model.embed_tokens.weight"][2].abs().sum() > 0  # the row trains now
