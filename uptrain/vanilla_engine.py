"""The vanilla (source) model on the block model's static engine, for `uptrain bench`.

Same skeleton as the block model's fast engine (`StaticEngine`): one static key/value buffer per layer
(B, H_kv, T + N - 1, d), the model's own layers with their attention switched to `static_attention`, token
rules on the device, one decoding step a CUDA graph per visible-length bucket, the host looking at the EOS
flag after every step. The ratio of the two engines' throughputs then measures the architecture, not the
engineering. transformers' `generate` stays the baseline users know (`uptrain bench --engine hf`).

    prefill: the prompt (B, T) through the model; its logits pick the first new token
    step k:  the last token at slot T + k - 1 -> logits -> the next token

A row joins between two steps (`prefill(prompt, rows)` writes its prompt into its row of the cache and picks
its first token) and leaves when it is done.
"""

import functools
from dataclasses import dataclass

import torch

from .generation_block_transformer import (
    EngineShape,
    GenerationRequest,
    KVPlan,
    StaticEngine,
    StaticKV,
    TokenRules,
    buckets,
    run_with_plan,
)


@dataclass
class VanillaPrompt:
    """Left-padded prompts and the visible length of each decoding step that follows them."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    max_new: int

    @property
    def slots(self) -> int:
        return self.input_ids.shape[1] + self.max_new - 1  # the last token is never fed back

    @property
    def visible(self) -> list[int]:
        return buckets(self.input_ids.shape[1], self.max_new - 1, self.slots)

    @property
    def shape(self) -> EngineShape:
        return EngineShape(self.input_ids.shape[0], self.slots, tuple(sorted(set(self.visible))))


class VanillaEngine(StaticEngine):
    """Static buffers of a vanilla causal LM; per row: `write_slot`, `position` and `key_valid` (where its next
    token goes, its position id, its valid slots), `last` (the token it feeds next) and the base's counters."""

    def __init__(self, model, shape: EngineShape, rules: TokenRules, cuda_graphs: bool = True,
                 compile_steps: bool = False):
        super().__init__(model, shape, rules, cuda_graphs, compile_steps)
        batch, device = shape.batch, self.device
        long = {"dtype": torch.long, "device": device}
        self.kv = StaticKV(model.config.num_hidden_layers, batch, shape.slots)
        self.key_valid = torch.zeros(batch, shape.slots, dtype=torch.bool, device=device)  # (B, S)
        self.write_slot = torch.zeros(batch, **long)  # (B,) each row's next cache slot
        self.position = torch.zeros(batch, 1, **long)  # (B, 1) position id of the token fed next
        self.last = torch.zeros(batch, **long)  # (B,) the token fed next
        for visible in shape.visible:
            self.graphs.add(("step", visible), functools.partial(self.step, visible))
        self.graphs.capture()

    @classmethod
    def lay_out(cls, model, request: GenerationRequest) -> VanillaPrompt:
        return VanillaPrompt(request.input_ids, request.attention_mask, request.rules.max_new)

    def advance(self, visible: int):
        self.graphs.run(("step", visible))

    def rounds(self, prompt: VanillaPrompt) -> list[int]:
        return prompt.visible

    def logits(self, plan: KVPlan, ids, **inputs):
        """(A, q) token ids -> the last position's logits (A, V), keys and values going where `plan` says."""
        model = self.model
        embeds = model.get_input_embeddings()(ids)
        return run_with_plan(model, plan, inputs_embeds=embeds, logits_to_keep=1, **inputs).logits[:, -1]

    @torch.no_grad()
    def prefill(self, prompt: VanillaPrompt, rows: torch.Tensor | None = None):
        """Start `rows` (default: all) on `prompt`: the prompts through the model (its own attention) into their
        rows of the cache, their first new token."""
        index = slice(None) if rows is None else rows
        length = prompt.input_ids.shape[1]
        real = prompt.attention_mask.bool()  # (R, T)
        self.start_rows(index)
        self.key_valid[index] = False
        self.key_valid[index, :length] = real
        self.write_slot[index] = length
        positions = (prompt.attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (R, T)
        self.position[index] = positions[:, -1:] + 1
        original = self.model.config._attn_implementation
        plan = KVPlan(self.kv, slice(0, length), length, prefill=original, rows=rows, write_valid=real)
        logits = self.logits(plan, prompt.input_ids, attention_mask=prompt.attention_mask, position_ids=positions)
        self.last[index] = self.emit(logits) if rows is None else self.emit_rows(logits, rows)
        self.settle()

    def step(self, visible: int):
        """Feed each row's `last` at its `write_slot`, attending over the first `visible` slots; pick the next
        token. Live rows move on by one slot and position."""
        self.key_valid.scatter_(1, self.write_slot[:, None], True)
        plan = KVPlan(self.kv, self.write_slot, visible, key_valid=self.key_valid[:, :visible])
        self.last.copy_(self.emit(self.logits(plan, self.last[:, None], position_ids=self.position)))
        self.settle()
        self.write_slot += self.live
        self.position += self.live[:, None]


generate_static = VanillaEngine.generate  # model.generate's contract (exactly max_new_tokens a row) on this engine
