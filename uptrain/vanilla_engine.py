"""The vanilla (source) model's generation with the block model's fast engine, for `uptrain bench`.

Same machinery as `generation_block_transformer`: one static key/value buffer per layer (B, H_kv, T + N, d),
the model's own layers with their attention switched to `static_attention`, token rules on the device, one
decoding step a CUDA graph per visible-length bucket, the host looking at one flag every `check_every`
steps. The ratio of the two engines' throughputs then measures the architecture, not the engineering.
transformers' `generate` stays the baseline users know (`uptrain bench --engine hf`).

    prefill: the prompt (B, T) through the model; its logits pick the first new token
    step k:  the last token at slot T + k - 1 -> logits -> the next token
"""

import functools
import weakref

import torch

from .generation_block_transformer import (
    DoneFlag,
    StaticKV,
    StepGraphs,
    TokenRules,
    _Plan,
    buckets,
    build_engine,
    choose_tokens,
    discard,
    generation_settings,
    parameters_key,
    planned,
)

_ENGINES = weakref.WeakKeyDictionary()  # model -> its last engine


@torch.no_grad()
def generate_static(model, input_ids, attention_mask=None, cuda_graphs: bool = True, check_every: int = 16,
                    generation_config=None, compile_steps: bool = False, **kwargs) -> torch.LongTensor:
    """Like `model.generate` (greedy or sampled, eos, min_new_tokens, left padding) but returns exactly
    max_new_tokens per row, pad_token_id after a row's EOS. Buffers and graphs are kept for the next call of
    the same shape (`release(model)` frees them)."""
    settings = generation_settings(model, generation_config, kwargs)
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("generate_static() needs left padding: every row's last position must be a real token")
    rules = TokenRules.from_settings(settings, length, input_ids.device)
    if rules.max_new == 0:
        return input_ids.clone()
    key = (batch, length, rules.key, input_ids.device, cuda_graphs, check_every, compile_steps, parameters_key(model))
    engine = _ENGINES.get(model)
    if engine is None or engine.key != key:
        discard(_ENGINES, model)
        engine = build_engine(VanillaEngine, model, key, batch, length, rules, cuda_graphs, check_every, compile_steps)
        _ENGINES[model] = engine
    try:
        tokens = engine.generate(input_ids, attention_mask)
    except Exception:
        discard(_ENGINES, model)
        raise
    return torch.cat([input_ids, tokens], dim=1)


def release(model) -> None:
    discard(_ENGINES, model)


class VanillaEngine:
    """Static buffers for one (batch, prompt length, rules), the prefill and the step functions over them."""

    def __init__(self, model, key, batch: int, length: int, rules: TokenRules, cuda_graphs: bool, check_every: int,
                 compile_steps: bool = False):
        self._model = weakref.ref(model)  # `_ENGINES` keeps the engine while the model lives: no strong ref back
        self.key, self.batch, self.length, self.rules, self.check_every = key, batch, length, rules, check_every
        device = next(model.parameters()).device
        self.slots = length + rules.max_new - 1  # the last token is never fed back
        self.kv = StaticKV(model.config.num_hidden_layers, batch, self.slots)
        long = {"dtype": torch.long, "device": device}
        self.key_valid = torch.zeros(batch, self.slots, dtype=torch.bool, device=device)  # (B, S)
        self.write_slot = torch.zeros(1, **long)
        self.position = torch.zeros(batch, 1, **long)  # (B, 1) position id of the token fed next
        self.last = torch.zeros(batch, **long)  # (B,) the token fed next
        self.produced = torch.zeros(batch, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, rules.max_new, **long)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.no_given = torch.zeros(batch, dtype=torch.bool, device=device)
        self.visible = buckets(length, rules.max_new - 1, self.slots)
        self.graphs = StepGraphs(device, cuda_graphs, compile_steps)
        for visible in sorted(set(self.visible)):
            self.graphs.add(visible, functools.partial(self.step, visible))
        self.graphs.capture()

    @property
    def model(self):
        return self._model()

    def generate(self, input_ids, attention_mask) -> torch.Tensor:
        self.prefill(input_ids, attention_mask)
        rules = self.rules
        flag = DoneFlag(self.tokens.device) if len(rules.eos) and rules.min_new < rules.max_new else None
        for k, visible in enumerate(self.visible):
            self.graphs.run(visible)
            if flag is not None and (k + 1) % self.check_every == 0 and flag.all_done(self.done):
                break
        return self.tokens.clone()

    def _logits(self, plan, **inputs):
        model = self.model
        with planned(model.base_model, plan):
            embeds = model.get_input_embeddings()(inputs.pop("ids"))
            return model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1, **inputs).logits[:, -1]  # (B, V)

    def _pick(self, logits):
        rules = self.rules
        token = choose_tokens(logits, rules.warpers, rules.eos, rules.min_new, self.produced, self.finished,
                              rules.pad_id, sample=rules.sample)
        rules.record(self.tokens, token, self.no_given, self.produced, self.finished)
        self.last.copy_(token)
        self.done.copy_((self.finished | (self.produced >= rules.max_new)).all())

    def prefill(self, input_ids, attention_mask):
        """Reset the buffers; the prompt through the model (its own attention), the first new token."""
        real = attention_mask.bool()
        self.key_valid.zero_()
        self.key_valid[:, : self.length] = real
        self.write_slot.fill_(self.length)
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        self.position.copy_(positions[:, -1:] + 1)
        self.produced.zero_()
        self.finished.zero_()
        self.tokens.fill_(self.rules.pad_id)
        original = self.model.config._attn_implementation
        plan = _Plan(self.kv, slice(0, self.length), self.length, prefill=original, write_valid=real)
        self._pick(self._logits(plan, ids=input_ids, attention_mask=attention_mask, position_ids=positions))

    def step(self, visible: int):
        """Feed `last` at `write_slot`, attending over the first `visible` slots; pick the next token."""
        self.key_valid.index_fill_(1, self.write_slot, True)
        plan = _Plan(self.kv, self.write_slot, visible, key_valid=self.key_valid[:, :visible])
        self._pick(self._logits(plan, ids=self.last[:, None], position_ids=self.position))
        self.position += 1
        self.write_slot += 1
