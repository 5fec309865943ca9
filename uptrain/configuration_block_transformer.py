"""Configuration of a Block Transformer (Ho et al., 2024) built from a source decoder-only architecture.

This file is copied next to every saved model and imports only transformers, so that
`AutoConfig.from_pretrained(path, trust_remote_code=True)` works where block-uptrain is not installed.
"""

from transformers import AutoConfig, PretrainedConfig


def _as_config(value):
    """A nested decoder config given as a dict (from config.json) or as a config object."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    return AutoConfig.for_model(value.pop("model_type"), **value)


class BlockTransformerConfig(PretrainedConfig):
    """Two decoders of the source architecture plus the block embedder and the prefix expansion.

    Args:
        block_decoder: config of the lower (block-level) decoder, the source's config with its layer
            count (and per-layer lists) cut to the block decoder's layers.
        token_decoder: config of the upper (token-level) decoder, a causal LM of the source architecture
            with its own embedding table, final norm and LM head.
        block_length: tokens per block (L_B).
        prefix_length: prefix vectors the context expands into (r).
        source_layers: which source layers each decoder was initialised from, for the record.
        embedding_stage: what the token decoder's base model does to `inputs_embeds` before its first
            layer (`scale`, `position_embedding` module name), so the prefix can bypass it.
        block_decoder_norm: whether the block decoder ends with its own final norm (as the paper's reference
            code does). Off by default, and in configs written before it existed: the block decoder's output
            is then a residual-stream state, like the source's state after the same layers.
    """

    model_type = "block_transformer"
    # Declared so that transformers hands settings such as `attn_implementation` down to both decoders.
    sub_configs = {"block_decoder": AutoConfig, "token_decoder": AutoConfig}

    def __init__(
        self,
        block_decoder=None,
        token_decoder=None,
        block_length: int = 4,
        prefix_length: int = 2,
        source_layers: dict | None = None,
        embedding_stage: dict | None = None,
        block_decoder_norm: bool = False,
        **kwargs,
    ):
        self.block_decoder = _as_config(block_decoder)
        self.token_decoder = _as_config(token_decoder)
        self.block_length = block_length
        self.prefix_length = prefix_length
        self.source_layers = source_layers or {}
        self.embedding_stage = embedding_stage or {}
        self.block_decoder_norm = block_decoder_norm
        if self.token_decoder is not None:
            # Tools that read these from the top-level config (generation, lm-eval) find them here.
            for key in ("vocab_size", "hidden_size", "bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(key, getattr(self.token_decoder, key, None))
        # The LM head is tied (or not) inside the token decoder; nothing is tied at the top level.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def _nested_as_dicts(self, output: dict) -> dict:
        for key in ("block_decoder", "token_decoder"):
            sub = getattr(self, key)
            if isinstance(sub, PretrainedConfig):
                output[key] = sub.to_dict()
        return output

    def to_dict(self):
        return self._nested_as_dicts(super().to_dict())

    def to_diff_dict(self):
        return self._nested_as_dicts(super().to_diff_dict())
