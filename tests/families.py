"""Tiny random models of several architectures, each with a small character-level tokenizer."""

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = SPECIALS + list(string.printable)
COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
LLAMA_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)

# One entry per family: a config with a quirk the converter must get right.
FAMILIES = {
    "llama": lambda: LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=True, **COMMON),
    "qwen2": lambda: Qwen2Config(**LLAMA_SHAPE, tie_word_embeddings=False, **COMMON),
    # partial rotary and parallel residual
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False, **COMMON
    ),
    # learned absolute positions, LayerNorm, tied head
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **COMMON),
    # per-layer sliding windows (layer_types) and embeddings scaled by sqrt(D)
    "gemma3_text": lambda: Gemma3TextConfig(
        **LLAMA_SHAPE, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"], **COMMON
    ),
    # embeddings scaled by sqrt(D)
    "gemma": lambda: GemmaConfig(**LLAMA_SHAPE, head_dim=16, **COMMON),
    # the base model multiplies inputs_embeds; logits are scaled
    "granite": lambda: GraniteConfig(**LLAMA_SHAPE, embedding_multiplier=6.0, logits_scaling=2.0, **COMMON),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def save_tiny_model(family: str, folder, seed: int = 0):
    """Build a random model of `family` with non-trivial weights, save it with a tokenizer; return it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so that a wrongly mapped one shows
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model
