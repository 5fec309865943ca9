"""Block Transformer (Ho et al., NeurIPS 2024) as a Hugging Face causal LM.

This file is copied next to every saved model and imports only torch and transformers, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works where block-uptrain is not
installed.

Notation: B batch, T tokens, L block length, N = T / L blocks, r prefix vectors, D hidden size, V vocab.

    tokens (B, T) --embed, concat L, project--> block embeddings (B, N, D)
    block decoder (lower layers, causal over blocks) --> context states (B, N, D)
    context of block j = block decoder output at block j-1 (block 0: the learned `start_context`)
    token decoder (upper layers), one window per block: [P_1..P_r, t_0..t_{L-2}], P = expansion(context)
    output at P_r scores t_0, output at t_i scores t_{i+1}

Block boundaries are anchored at each row's first real token, so that teacher forcing and generation
define the same distribution whatever the left padding.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from .configuration_block_transformer import BlockTransformerConfig
from .generation_block_transformer import BlockGenerationMixin

# Attribute names of the final norm in transformers' base models. The block decoder drops it unless its
# config says `block_decoder_norm`: its output is then a residual-stream state that enters the token decoder.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def final_norm_name(base_model: nn.Module) -> str:
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(base_model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(base_model).__name__} has no final norm among {FINAL_NORM_NAMES}")


def anchor_offsets(attention_mask: torch.Tensor, block_length: int) -> torch.Tensor:
    """Per-row left shift (B,) that puts each row's first real token on a block boundary."""
    first_real = (attention_mask.cumsum(1) == 0).sum(1)  # (B,) number of leading pads
    return first_real % block_length


def initial_weights(dim: int, block_length: int, prefix_length: int) -> dict[str, torch.Tensor]:
    """Embedder = mean of the block's token embeddings, expansion = identity (each prefix = the context)."""
    eye = torch.eye(dim)
    return {
        "embedder_projection.weight": torch.cat([eye / block_length] * block_length, dim=1),  # (D, L*D)
        "embedder_projection.bias": torch.zeros(dim),
        "expansion.weight": torch.cat([eye] * prefix_length, dim=0),  # (r*D, D)
        "expansion.bias": torch.zeros(prefix_length * dim),
    }


class BlockTransformerPreTrainedModel(PreTrainedModel):
    config_class = BlockTransformerConfig
    base_model_prefix = "block_transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        """The paper's uptraining init (see `initial_weights`); the decoders initialise themselves."""
        if isinstance(module, BlockTransformerForCausalLM):
            config = self.config
            weights = initial_weights(module.start_context.shape[0], config.block_length, config.prefix_length)
            for name, value in weights.items():
                init.copy_(module.get_parameter(name), value)
            init.zeros_(module.start_context)


class BlockTransformerForCausalLM(BlockGenerationMixin, BlockTransformerPreTrainedModel):
    """Block decoder + token decoder, each built from the source architecture's own transformers class."""

    def __init__(self, config: BlockTransformerConfig):
        super().__init__(config)
        dim = config.block_decoder.hidden_size
        self.block_decoder = AutoModel.from_config(config.block_decoder)
        if not config.block_decoder_norm:
            setattr(self.block_decoder, final_norm_name(self.block_decoder), nn.Identity())
        self.token_decoder = AutoModelForCausalLM.from_config(config.token_decoder)
        self.embedder_projection = nn.Linear(config.block_length * dim, dim)
        self.expansion = nn.Linear(dim, config.prefix_length * dim)
        self.start_context = nn.Parameter(torch.zeros(dim))
        self.post_init()

    # -- pieces -----------------------------------------------------------------------------------

    def embed_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N*L) token ids -> (B, N, D) block embeddings."""
        batch, length = input_ids.shape
        tokens = self.block_decoder.get_input_embeddings()(input_ids)  # (B, N*L, D)
        blocks = tokens.reshape(batch, length // self.config.block_length, -1)  # (B, N, L*D)
        return self.embedder_projection(blocks)

    def prefix_inputs(self, context: torch.Tensor) -> torch.Tensor:
        """(..., D) context states -> (..., r, D) token-decoder inputs for the prefix slots.

        The prefix vectors are residual-stream states. The token decoder's base model passes its
        inputs through an embedding stage first (a scale, learned absolute positions); the inverse of
        that stage is applied here so that the prefix enters its first layer unchanged.
        """
        r = self.config.prefix_length
        prefix = self.prefix_states(context)  # (..., r, D)
        stage = self.config.embedding_stage
        if stage.get("position_embedding"):
            table = getattr(self.token_decoder.base_model, stage["position_embedding"])
            prefix = prefix - table(torch.arange(r, device=prefix.device))
        return prefix / stage.get("scale", 1.0)

    def prefix_states(self, context: torch.Tensor) -> torch.Tensor:
        """(..., D) context states -> (..., r, D) prefix vectors as residual-stream states (what the prefix slots
        hold when the token decoder's first layer reads them)."""
        return self.expansion(context).unflatten(-1, (self.config.prefix_length, -1))

    def window_position_ids(self, device) -> torch.Tensor:
        """Position ids inside a token-decoder window, the same in training and in generation: (r+L-1,)."""
        return torch.arange(self.config.prefix_length + self.config.block_length - 1, device=device)

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Causal-LM logits: `logits[:, t]` scores token t+1 for every t (B, T, V); `loss` as HF computes it."""
        batch, length = input_ids.shape
        block_length = self.config.block_length
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        padded = bool((attention_mask == 0).any())

        # Re-lay each row so its first real token starts a block; pad the end to whole blocks.
        shift = anchor_offsets(attention_mask, block_length)  # (B,)
        anchored_length = -(-length // block_length) * block_length
        index = torch.arange(anchored_length, device=input_ids.device) + shift[:, None]  # (B, N*L)
        inside = index < length
        index = index.clamp(max=length - 1)
        ids = torch.where(inside, input_ids.gather(1, index), 0)
        mask = torch.where(inside, attention_mask.gather(1, index), 0)

        scores = self.score_tokens(ids, mask if padded else None)  # (B, (N+1)*L, V), scores[:, u] ~ token u
        aligned = scores[:, 1 : anchored_length + 1]  # (B, N*L, V), aligned[:, u] ~ token u+1
        back = (torch.arange(length, device=ids.device) - shift[:, None]).clamp(min=0)  # (B, T)
        logits = aligned.gather(1, back[..., None].expand(-1, -1, aligned.shape[-1]))  # (B, T, V)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def score_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Anchored (B, N*L) ids -> (B, (N+1)*L, V) scores, where scores[:, u] predicts token u.

        Block N (one past the end) is scored too: its first position predicts the token after the input.
        """
        batch, length = ids.shape
        windows, positions = self.token_windows(ids, mask, past_end=True)
        logits = self.token_decoder(
            inputs_embeds=windows, position_ids=positions, logits_to_keep=self.config.block_length
        ).logits
        return logits.reshape(batch, length + self.config.block_length, -1)  # (B, (N+1)*L, V)

    def next_token_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unpadded (B, T) ids, T a multiple of L -> (B, T-1, D) final token-decoder states.

        states[:, t] is what the LM head turns into logits[:, t] (the score of token t+1), for training
        losses that apply the head themselves, chunk by chunk, rather than hold (B, T, V) logits. The
        window past the end, whose scores no training token needs, is not computed.
        """
        batch, length = input_ids.shape
        windows, positions = self.token_windows(input_ids, None, past_end=False)
        states = self.token_decoder.base_model(inputs_embeds=windows, position_ids=positions).last_hidden_state
        states = states[:, -self.config.block_length :].reshape(batch, length, -1)  # states[:, u] ~ token u
        return states[:, 1:]

    def block_contexts(self, ids: torch.Tensor, mask: torch.Tensor | None, past_end: bool) -> torch.Tensor:
        """Anchored (B, N*L) ids -> contexts (B, W, D), context[:, j] serving block j: the start context for
        block 0 (and a row's first block after padding), else the block decoder's output at block j-1. W = N+1
        with the block past the end, else N."""
        batch, length = ids.shape
        block_length = self.config.block_length
        blocks = length // block_length
        block_mask = None if mask is None else mask[:, ::block_length]  # (B, N): a block is real iff its first token is
        block_positions = torch.arange(blocks, device=ids.device).expand(batch, -1)
        if block_mask is not None:
            block_positions = (block_mask.cumsum(1) - 1).clamp(min=0)

        hidden = self.block_decoder(
            inputs_embeds=self.embed_blocks(ids), attention_mask=block_mask, position_ids=block_positions
        ).last_hidden_state  # (B, N, D)
        start = self.start_context.to(hidden.dtype).expand(batch, 1, -1)
        context = torch.cat([start, hidden if past_end else hidden[:, :-1]], dim=1)  # (B, W, D)
        if block_mask is not None:  # a block after padding is a row's first block: it starts from start_context
            after_real = F.pad(block_mask, (1, 0)).bool()[:, : context.shape[1], None]  # (B, W, 1)
            context = torch.where(after_real, context, start)
        return context

    def token_windows(self, ids: torch.Tensor, mask: torch.Tensor | None, past_end: bool):
        """Token-decoder inputs for every block of anchored (B, N*L) ids: windows (B*W, r+L-1, D) and their
        position ids, W = N+1 with the block past the end, else N. Window j holds block j's prefix (from the
        context before it) and its first L-1 tokens."""
        batch, length = ids.shape
        block_length = self.config.block_length
        blocks = length // block_length
        context = self.block_contexts(ids, mask, past_end)  # (B, W, D)

        window_tokens = ids.view(batch, blocks, block_length)[..., :-1]  # (B, N, L-1)
        if past_end:
            window_tokens = F.pad(window_tokens, (0, 0, 0, 1))  # (B, N+1, L-1): block N's tokens are unknown
        token_embeds = self.token_decoder.get_input_embeddings()(window_tokens)  # (B, W, L-1, D)
        windows = torch.cat([self.prefix_inputs(context).to(token_embeds.dtype), token_embeds], dim=2)
        windows = windows.flatten(0, 1)  # (B*W, r+L-1, D)
        positions = self.window_position_ids(ids.device).expand(windows.shape[0], -1)
        return windows, positions
