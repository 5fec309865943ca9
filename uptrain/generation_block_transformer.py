"""Block-cached generation for the Block Transformer (DESIGN.md §1 "Generation", contract 5).

Shipped next to every saved model with the modeling file; imports only torch and transformers.

    prefill: the prompt's whole blocks go through the block decoder only (its cache: one position a block)
    per block: the token decoder, with a fresh cache of at most r + L positions, emits L tokens from the
               current context (the prompt's trailing partial block is fed as given tokens);
               the finished block is embedded and one block-decoder step yields the next context.

Rows of a left-padded batch are re-laid so that each row's first real token starts a block and all rows'
whole blocks end together; the first block step completes every row's partial block, its given tokens
forced, and from then on all rows run in lockstep. Shapes are fixed per step and the loop has no
data-dependent control flow inside a block, so that caches can be preallocated later.
"""

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def _cache_argument(module) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever the decoder takes."""
    return _cache_argument_of(type(module))


@functools.lru_cache
def _cache_argument_of(module_class) -> str:
    parameters = inspect.signature(module_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class BlockGenerationMixin:
    """`generate()` with the keyword arguments transformers users know."""

    def _generation_settings(self, generation_config, kwargs) -> GenerationConfig:
        base = generation_config or getattr(self, "generation_config", None) or GenerationConfig()
        settings = copy.deepcopy(base)
        unused = settings.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(sorted(unused))}")
        return settings

    def _warpers(self, settings: GenerationConfig) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if not settings.do_sample:
            return warpers
        if settings.temperature is not None and settings.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
        return warpers

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor:
        """Returns (B, T + max_new_tokens): the prompt as given, then exactly max_new_tokens per row,
        with pad_token_id after a row's EOS (as transformers pads)."""
        settings = self._generation_settings(generation_config, kwargs)
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("generate() needs left padding: every row's last position must be a real token")
        if streamer is not None and batch > 1:
            raise ValueError("a streamer works with batch size 1 only")
        max_new = settings.max_new_tokens
        if max_new is None:
            max_new = max(settings.max_length - length, 0) if settings.max_length else 20
        eos = torch.tensor(_token_ids(settings.eos_token_id), device=device, dtype=torch.long)
        pad_id = settings.pad_token_id if settings.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        min_new = settings.min_new_tokens or 0
        warpers = self._warpers(settings)
        if streamer is not None:
            streamer.put(input_ids.cpu())

        block_length = self.config.block_length
        real = attention_mask.sum(1)  # (B,)
        whole, partial = real // block_length, real % block_length  # (B,), (B,)
        blocks = int(whole.max())

        # Prompt re-laid in blocks: row b's whole blocks end at block `blocks`; its partial block comes after.
        first_real = length - real  # (B,)
        slot = torch.arange(blocks * block_length, device=device)  # (F*L,)
        k = slot[None] - (blocks - whole)[:, None] * block_length  # (B, F*L) index among the row's real tokens
        prompt_blocks = input_ids.gather(1, (first_real[:, None] + k.clamp(min=0)).clamp(max=length - 1))
        inside = torch.arange(block_length, device=device)[None]  # (1, L)
        k_partial = whole[:, None] * block_length + inside  # (B, L)
        forced = input_ids.gather(1, (first_real[:, None] + k_partial).clamp(max=length - 1))  # (B, L)
        n_forced = partial  # (B,)

        # Prefill: the block decoder alone over whole blocks.
        block_cache = DynamicCache(config=self.config.block_decoder)
        cache_arg = _cache_argument(self.block_decoder)
        block_mask = (torch.arange(blocks, device=device)[None] >= (blocks - whole)[:, None]).long()  # (B, F)
        start = self.start_context[None].expand(batch, -1)  # (B, D)
        context = start
        if blocks:
            positions = (block_mask.cumsum(1) - 1).clamp(min=0)
            hidden = self.block_decoder(
                inputs_embeds=self.embed_blocks(prompt_blocks), attention_mask=block_mask, position_ids=positions,
                use_cache=True, **{cache_arg: block_cache},
            ).last_hidden_state  # (B, F, D)
            context = torch.where(whole[:, None] > 0, hidden[:, -1], start)

        steps = -(-(max_new + int(partial.max())) // block_length)  # block steps that give every row max_new
        rows = _ActiveRows(
            index=torch.arange(batch, device=device),
            produced=torch.zeros(batch, dtype=torch.long, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        output = _Output(torch.full((batch, max_new), pad_id, dtype=torch.long, device=device), eos, pad_id, min_new, warpers, streamer)
        for step in range(steps):
            block = self._decode_block(context, forced, n_forced, rows, output)  # (A, L) for A active rows
            if step == steps - 1:
                break
            done = rows.finished | (rows.produced >= max_new)  # (A,)
            if bool(done.any()):  # between blocks, drop finished rows from every piece of state
                if bool(done.all()):
                    break
                keep = (~done).nonzero()[:, 0]
                rows = rows.select(keep)
                block_cache.reorder_cache(keep)
                block, block_mask, forced = block[keep], block_mask[keep], forced[keep]
            block_mask = torch.cat([block_mask, block_mask.new_ones(block_mask.shape[0], 1)], dim=1)
            position = block_mask.sum(1, keepdim=True) - 1  # (A, 1)
            hidden = self.block_decoder(
                inputs_embeds=self.embed_blocks(block), attention_mask=block_mask, position_ids=position,
                use_cache=True, **{cache_arg: block_cache},
            ).last_hidden_state  # (A, 1, D)
            context = hidden[:, -1]
            n_forced = torch.zeros_like(rows.produced)
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, output.tokens], dim=1)

    def _decode_block(self, context, forced, n_forced, rows: "_ActiveRows", output: "_Output"):
        """The token decoder's L steps for one block; writes generated tokens into `output.tokens`.

        context (A, D) for the A active rows; forced (A, L) given tokens, used where position < n_forced (A,).
        Returns the block's tokens (A, L).
        """
        active = context.shape[0]
        block_length, r = self.config.block_length, self.config.prefix_length
        positions = self.window_position_ids(context.device)[None].expand(active, -1)  # (A, r+L-1)
        cache = DynamicCache(config=self.config.token_decoder)
        cache_arg = _cache_argument(self.token_decoder)
        embeds = self.prefix_inputs(context)  # (A, r, D)
        step_positions = positions[:, :r]
        block = []
        for i in range(block_length):
            logits = self.token_decoder(
                inputs_embeds=embeds, position_ids=step_positions, use_cache=True, logits_to_keep=1,
                **{cache_arg: cache},
            ).logits[:, -1].float()  # (A, V)
            token = output.choose(logits, rows, forced[:, i], is_given=i < n_forced)  # (A,)
            block.append(token)
            if i + 1 < block_length:
                embeds = self.token_decoder.get_input_embeddings()(token[:, None])  # (A, 1, D)
                step_positions = positions[:, r + i : r + i + 1]
        return torch.stack(block, dim=1)


@dataclass
class _ActiveRows:
    """The rows still generating: their index in the batch, tokens generated so far, whether EOS came."""

    index: torch.Tensor  # (A,)
    produced: torch.Tensor  # (A,)
    finished: torch.Tensor  # (A,)

    def select(self, keep: torch.Tensor) -> "_ActiveRows":
        return _ActiveRows(self.index[keep], self.produced[keep], self.finished[keep])


@dataclass
class _Output:
    """Where generated tokens go (B, max_new), and the rules that pick them."""

    tokens: torch.Tensor
    eos: torch.Tensor
    pad_id: int
    min_new: int
    warpers: LogitsProcessorList
    streamer: object

    def choose(self, logits, rows: _ActiveRows, given, is_given):
        """Pick the next token of every active row (A,), record the generated ones, update `rows`."""
        if len(self.eos) and self.min_new:
            early = (rows.produced < self.min_new)[:, None]
            logits[:, self.eos] = torch.where(early, float("-inf"), logits[:, self.eos])
        if self.warpers:
            chosen = torch.multinomial(torch.softmax(self.warpers(None, logits), dim=-1), 1)[:, 0]
        else:
            chosen = logits.argmax(-1)
        chosen = torch.where(rows.finished, self.pad_id, chosen)
        token = torch.where(is_given, given, chosen)  # (A,)
        writes = ~is_given & (rows.produced < self.tokens.shape[1])  # (A,)
        column = rows.produced.clamp(max=self.tokens.shape[1] - 1)
        current = self.tokens[rows.index, column]
        self.tokens[rows.index, column] = torch.where(writes, token, current)
        if self.streamer is not None and bool(writes[0]):
            self.streamer.put(token.cpu())
        if len(self.eos):
            rows.finished |= writes & torch.isin(token, self.eos)
        rows.produced += writes.long()
        return token
