"""Block-cached generation for the Block Transformer (docs/concepts.md, "The Block Transformer"; contract 5).

Shipped next to every saved model with the modeling file; imports only torch and transformers.

    prefill: the prompt's whole blocks go through the block decoder only (its cache: one position a block)
    per block: the token decoder, with a cache of at most r + L positions, emits L tokens from the
               current context (the prompt's trailing partial block is fed as given tokens);
               the finished block is embedded and one block-decoder step yields the next context.

Rows of a left-padded batch are re-laid so that each row's first real token starts a block and all rows'
whole blocks end together; the first block step completes every row's partial block, its given tokens
forced, and from then on all rows run in lockstep.

Two engines run that loop, with the same token rules (`TokenRules`) and the same results:

- eager: transformers' dynamic caches, a Python loop, finished rows dropped between blocks (CPU default).
- fast (`BlockEngine`, the CUDA default): a `StaticEngine`, whose buffers are preallocated for the whole
  batch and length and whose steps are functions of those buffers with fixed shapes and no host
  synchronisation: one "token block" (the L token-decoder steps with sampling, EOS and min_new_tokens on
  the device) and one "block step" per visible-length bucket. On CUDA each is captured once as a CUDA graph
  (`StepGraphs`) and replayed; elsewhere the same functions run eagerly. The host looks at one flag a round
  (a round late on CUDA, so the device never waits) to stop when every row is done. `compile_steps` puts
  each step through `torch.compile` before its capture. The vanilla model's engine in `uptrain bench` is a
  `StaticEngine` too.

Where keys and values go: the engines call the decoders' own transformers modules (any family) with
`use_cache=False`, explicit position ids, their attention implementation switched to `static_kv` (a
function registered with transformers' `AttentionInterface`) and a `kv_plan=KVPlan(...)` keyword argument,
which transformers hands to the attention function of every layer (`run_with_plan`). That function receives
each layer's new keys and values after the family's own projections, rotary embedding and norms, writes
them into the static buffers at the plan's slots, and attends over the buffers with plain batched matmuls
(grouped-query heads without repeating keys). A prefill writes the buffers the same way but delegates the
attention to the decoder's own implementation, so that it is numerically the eager path's. Relied on:
`AttentionInterface`, the attention-function signature, and that a decoder hands its call's extra keyword
arguments to every layer's attention function, which transformers 5.17 and later share (a layer that does
not is detected: `Unsupported`); transformers' StaticCache is not used because its update signature changed
between those releases and its masks are built by transformers on every call.

Rows join and leave: every piece of a static engine's state is per row -- each row's cache write slot,
valid slots, position, given tokens, produced count, EOS flag -- and a step moves a row on only while it is
live. `prefill(prompt, rows)` starts some rows on new prompts (their cache rows rewritten, their counters
reset) while the other rows keep their state, so a row joins a running batch between two rounds of
`advance(visible)` (a block for the block model, a token for the vanilla one), the visible bucket covering
every live row's write slot. A row leaves when it is done (EOS, or its tokens all generated): it stops
moving and produces padding until a prefill gives it a new prompt (or `stop(rows)` ends it early). Rows of a
new engine are done. With `TokenRules.for_rows` each row also has its own token limit and sampling settings
(`RowSampling`, tensors on the device), and its random draws are a function of its seed and token index
alone, so that a row's tokens do not depend on what the other rows hold: the engine can serve unrelated
requests side by side.
"""

import copy
import functools
import inspect
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import AttentionInterface, DynamicCache, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import AttentionMaskInterface

ENGINES = ("auto", "fast", "eager")
STATIC_ATTENTION = "static_kv"  # decoding steps: attention over the static buffers, no mask built
BUCKET = 32  # a decoding step attends over the first k * BUCKET cache slots; one captured graph per k


def cache_argument(module) -> str:
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


# -- settings and token rules, shared by every engine --------------------------------------------------------


def generation_settings(model, generation_config, kwargs) -> GenerationConfig:
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    settings = copy.deepcopy(base)
    unused = settings.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(sorted(unused))}")
    return settings


def make_warpers(settings: GenerationConfig) -> LogitsProcessorList:
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


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so that no product overflows."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" mixer): nearby inputs give unrelated outputs."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_draws(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One number in [0, 1) for each (seed, counter): seeds (A, 2) as two 32-bit halves, counters (A,) -> (A,)
    float32, a function of the pair alone (counter-based, like Philox): no generator state, no host
    synchronisation, the same inside a captured graph."""
    state = _mix32(seeds[:, 0] ^ 0x9E3779B9)
    state = _mix32(state ^ seeds[:, 1])
    state = _mix32(state ^ (counters & _MASK32))
    return (state >> 8).float() * 2.0**-24


def seed_halves(seed: int) -> tuple[int, int]:
    """A seed of any size as the two 32-bit halves `uniform_draws` takes (its low 64 bits)."""
    seed &= 2**64 - 1
    return seed & _MASK32, seed >> 32


@dataclass
class RowSampling:
    """Each row's own sampling settings and token limit, for an engine whose rows hold unrelated requests.

    Tensors (B,) on the device, written between rounds when a row starts: `temperature` (0: greedy), `top_k`
    (0: all tokens), `top_p` (1: all), `seeds` (B, 2), `max_new`, `ignore_eos` (EOS does not end the row). A
    row's n-th generated token is drawn by inverse transform sampling from its warped softmax (temperature,
    then top-k, then top-p, as transformers' warpers do) with the uniform number of (its seed, n): the same
    tokens whatever the other rows hold or how many rows the engine has. `mode` is what the steps compute, the
    least that the live rows need: "greedy", "sample" (temperature only) or "filter" (top-k or top-p too); a
    row's tokens are the same in every mode that covers it, so captured steps are captured once, in "filter"."""

    max_new: torch.Tensor  # (B,) long
    temperature: torch.Tensor  # (B,) float32
    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) float32
    seeds: torch.Tensor  # (B, 2) long
    ignore_eos: torch.Tensor  # (B,) bool
    mode: str = "filter"

    MODES: ClassVar[tuple[str, ...]] = ("greedy", "sample", "filter")

    @classmethod
    def empty(cls, batch: int, device) -> "RowSampling":
        long = {"dtype": torch.long, "device": device}
        return cls(
            max_new=torch.zeros(batch, **long),
            temperature=torch.zeros(batch, device=device),
            top_k=torch.zeros(batch, **long),
            top_p=torch.ones(batch, device=device),
            seeds=torch.zeros(batch, 2, **long),
            ignore_eos=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    def set_row(
        self,
        row: int,
        max_new: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        ignore_eos: bool = False,
    ):
        """Settings of one row, for the request it starts next."""
        self.max_new[row] = max_new
        self.ignore_eos[row] = ignore_eos
        self.temperature[row] = temperature
        self.top_k[row] = top_k
        self.top_p[row] = top_p
        self.seeds[row] = torch.tensor(seed_halves(seed))

    @staticmethod
    def mode_for(temperature: float, top_k: int, top_p: float) -> str:
        """The least mode that covers a row with these settings."""
        if temperature <= 0:
            return "greedy"
        return "filter" if top_k > 0 or top_p < 1 else "sample"

    def choose(self, logits, produced, rows: torch.Tensor | None = None):
        """The next token of each of A rows (A, V) -> (A,): argmax where a row's temperature is 0, else a draw.
        `rows` (A,): the rows' indices in the batch (None: every row)."""
        greedy = logits.argmax(-1)
        if self.mode == "greedy":
            return greedy
        pick = (lambda values: values) if rows is None else (lambda values: values[rows])
        temperature, top_k, top_p = pick(self.temperature), pick(self.top_k), pick(self.top_p)
        scores = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]  # (A, V)
        if self.mode == "filter":
            scores = self.filtered(scores, top_k, top_p)
        cdf = torch.softmax(scores, dim=-1).cumsum(-1)  # (A, V), in vocabulary order
        total = cdf[:, -1:]
        target = torch.minimum(
            uniform_draws(pick(self.seeds), produced)[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
        )  # (A, 1) strictly below the total
        sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
        return torch.where(temperature > 0, sampled, greedy)

    @staticmethod
    def filtered(scores, top_k, top_p):
        """scores (A, V) with tokens outside each row's top-k (ties kept) and top-p nucleus set to -inf."""
        vocab = scores.shape[1]
        ranked, order = scores.sort(dim=-1, descending=True, stable=True)  # (A, V)
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        keep = ranked >= ranked.gather(1, (k - 1)[:, None])  # (A, V)
        probs = torch.softmax(ranked.masked_fill(~keep, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the likelier tokens
        keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1)
        keep = torch.empty_like(keep).scatter_(1, order, keep)  # back to vocabulary order
        return scores.masked_fill(~keep, float("-inf"))


@dataclass
class TokenRules:
    """What decides and records the generated tokens of one generate call (or, with `per_row`, of each row)."""

    max_new: int
    eos: torch.Tensor  # (E,) long
    pad_id: int
    min_new: int
    warpers: LogitsProcessorList
    sample: bool  # do_sample: draw from the warped softmax, else argmax
    key: tuple  # everything above that a captured graph bakes in
    per_row: RowSampling | None = None  # each row's settings and limit; `max_new` is then the most of any row

    @classmethod
    def from_settings(cls, settings: GenerationConfig, prompt_length: int, device) -> "TokenRules":
        max_new = settings.max_new_tokens
        if max_new is None:
            max_new = max(settings.max_length - prompt_length, 0) if settings.max_length else 20
        eos_ids = _token_ids(settings.eos_token_id)
        pad_id = settings.pad_token_id if settings.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        min_new = settings.min_new_tokens or 0
        sample = bool(settings.do_sample)
        sampling = (settings.temperature, settings.top_k, settings.top_p) if sample else None
        eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
        key = (max_new, tuple(eos_ids), int(pad_id), min_new, sample, sampling)
        return cls(max_new, eos, int(pad_id), min_new, make_warpers(settings), sample, key)

    @classmethod
    def for_rows(cls, batch: int, max_new: int, eos_ids: list[int], pad_id: int, device) -> "TokenRules":
        """Rules whose sampling settings and token limits are each row's (`RowSampling`): rows of one engine
        serving unrelated requests. `max_new` bounds every row's limit."""
        eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
        key = (max_new, tuple(eos_ids), int(pad_id), "per row", batch)
        return cls(max_new, eos, int(pad_id), 0, LogitsProcessorList(), False, key, RowSampling.empty(batch, device))

    def limit(self, rows: torch.Tensor | None = None):
        """The token limit of `rows` (A,) (None: every row): an int, or (A,) with per-row settings."""
        if self.per_row is None:
            return self.max_new
        return self.per_row.max_new if rows is None else self.per_row.max_new[rows]

    @property
    def may_stop_early(self) -> bool:
        """Whether an EOS can end every row before max_new tokens."""
        return len(self.eos) > 0 and self.min_new < self.max_new

    def choose(self, logits, produced, finished, rows: torch.Tensor | None = None, batch: int | None = None):
        """The next token of each of A rows: (A, V) logits -> (A,).

        `logits` may be in the model's dtype and are changed in place (callers pass a fresh tensor). Greedy picks
        from them as they are, the token an exact float32 upcast would give, without a float32 copy of the
        logits; sampling works in float32. EOS is blocked while a row has fewer than `min_new` tokens. Sampling
        draws from the warped softmax by the exponential race argmax(p / E), E ~ Exp(1), which has the same
        distribution as `torch.multinomial` and needs no host synchronisation; finished rows get `pad_id`.
        `rows` (A,): the A rows are these of a batch of `batch`; the draws are made for all of them, so that
        the generator advances the same whichever rows are left, and every engine draws the same numbers for
        a row. With `per_row` settings each row follows its own (`RowSampling.choose`).
        """
        if len(self.eos) and self.min_new:
            early = (produced < self.min_new)[:, None]  # (A, 1)
            logits.index_copy_(1, self.eos, torch.where(early, float("-inf"), logits.index_select(1, self.eos)))
        if self.per_row is not None:
            chosen = self.per_row.choose(logits, produced, rows)
        elif self.sample:
            logits = logits.float()
            probs = torch.softmax(self.warpers(None, logits) if self.warpers else logits, dim=-1)
            if rows is None:
                race = torch.empty_like(probs).exponential_()
            else:
                race = probs.new_empty(batch, probs.shape[1]).exponential_()[rows]
            race = race.clamp_(min=torch.finfo(probs.dtype).tiny)
            chosen = (probs / race).argmax(-1)
        else:
            chosen = logits.argmax(-1)
        return torch.where(finished, self.pad_id, chosen)

    def record(self, tokens, token, is_given, produced, finished, rows):
        """Write each of A rows' token into its row `rows` (A,) of `tokens` (B, max_new), at the row's next
        column, unless it was given (`is_given` (A,), None: none was) or the row is full; update `finished`
        (EOS) and `produced` (A,) in place. Returns which rows wrote (A,)."""
        writes = produced < self.limit(rows)  # (A,)
        if is_given is not None:
            writes &= ~is_given
        column = produced.clamp(max=self.max_new - 1)  # (A,)
        tokens[rows, column] = torch.where(writes, token, tokens[rows, column])
        if len(self.eos):
            ends = writes & (token[:, None] == self.eos).any(-1)  # (A,)
            finished |= ends if self.per_row is None else ends & ~self.per_row.ignore_eos[rows]
        produced += writes.long()
        return writes


@dataclass
class GenerationRequest:
    """One generate call, checked: left-padded prompts and the rules of their new tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens, every row's last one real
    rules: TokenRules

    @classmethod
    def of(cls, model, input_ids, attention_mask=None, generation_config=None, kwargs=None) -> "GenerationRequest":
        settings = generation_settings(model, generation_config, kwargs or {})
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("generate() needs left padding: every row's last position must be a real token")
        rules = TokenRules.from_settings(settings, input_ids.shape[1], input_ids.device)
        return cls(input_ids, attention_mask, rules)


# -- where keys and values go ---------------------------------------------------------------------------------


class StaticKV:
    """Preallocated keys and values of one decoder: per layer (B, H_kv, length, d), allocated at the first
    write (their head count and size are the attention module's, whatever the family)."""

    def __init__(self, layers: int, batch: int, length: int):
        self.batch, self.length = batch, length
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def write(self, layer: int, key, value, plan: "KVPlan"):
        """Store one call's key and value (A, H_kv, q, d) where `plan` says; returns the layer's buffers."""
        if self.keys[layer] is None:
            shape = (self.batch, key.shape[1], self.length, key.shape[3])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        keys, values = self.keys[layer], self.values[layer]
        if plan.write_valid is not None:  # prefill: padding slots hold zeros, never a NaN that a mask would not stop
            keep = plan.write_valid[:, None, :, None]
            key, value = torch.where(keep, key, 0), torch.where(keep, value, 0)
        if isinstance(plan.write, slice):
            rows = slice(None) if plan.rows is None else plan.rows
            keys[rows, :, plan.write] = key
            values[rows, :, plan.write] = value
        else:  # (B,) device slots, one a row: inside one captured graph the slots move from step to step
            index = plan.write.view(-1, 1, 1, 1).expand_as(key)  # (B, H_kv, 1, d)
            keys.scatter_(2, index, key)
            values.scatter_(2, index, value)
        return keys, values


@dataclass
class KVPlan:
    """Where one decoder call's keys and values go, and which slots of the buffers each query sees."""

    kv: StaticKV
    write: slice | torch.Tensor  # the slots of this call's keys: a slice, or (B,) one slot a row
    visible: int  # queries attend to slots [0, visible)
    first_query: int | None = None  # slot of the first query, the same in every row; None: a row's query is at `write`
    key_valid: torch.Tensor | None = None  # (B, visible) bool: False for slots a row must not see
    prefill: str | None = None  # the decoder's own attention implementation, which a prefill delegates to
    rows: torch.Tensor | None = None  # prefill: the buffer rows (A,) of this call's A rows; None: all rows
    write_valid: torch.Tensor | None = None  # prefill: (A, written) bool, slots stored as zeros (padding)
    seen: set = field(default_factory=set)  # layers whose attention went through `static_attention`

    @property
    def implementation(self) -> str:
        """The attention implementation a decoder runs this plan with."""
        return STATIC_ATTENTION if self.prefill is None else _prefill_implementation(self.prefill)


class Unsupported(RuntimeError):
    """The fast engine cannot run this architecture (a layer does not go through the attention interface)."""


def run_with_plan(decoder: torch.nn.Module, plan: KVPlan, **inputs):
    """`decoder(**inputs, use_cache=False, kv_plan=plan)`, its attention switched to `static_attention` for this
    call; then checks that every layer's keys and values went where `plan` says."""
    config = decoder.config
    original = config._attn_implementation
    if str(original).startswith(STATIC_ATTENTION):
        raise RuntimeError("nested static-cache decoder calls")
    config._attn_implementation = plan.implementation
    try:
        output = decoder(
            **inputs, use_cache=False, kv_plan=plan
        )  # transformers hands kv_plan to every layer's attention
    finally:
        config._attn_implementation = original
    layers = config.num_hidden_layers
    if plan.seen != set(range(layers)):
        raise Unsupported(
            f"{type(decoder).__name__}: {len(plan.seen)} of {layers} layers went through the "
            "attention interface; use generate(engine='eager')"
        )
    return output


def static_attention(module, query, key, value, attention_mask, kv_plan: KVPlan | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, q, d), this call's key and value (B, H_kv, q, d)
    -> ((B, q, H, d), None). Writes key and value into `kv_plan`'s buffers, then attends over them."""
    if kv_plan is None:
        raise Unsupported(
            f"{type(module).__name__} does not hand the decoder's keyword arguments to its attention; "
            "use generate(engine='eager')"
        )
    layer = module.layer_idx
    kv_plan.seen.add(layer)
    keys, values = kv_plan.kv.write(layer, key, value, kv_plan)
    if kv_plan.prefill is not None:
        return _original_attention(module, kv_plan.prefill)(module, query, key, value, attention_mask, **kwargs)
    visible = kv_plan.visible
    return _attend(query, keys[:, :, :visible], values[:, :, :visible], kv_plan, kwargs)


def _attend(query, keys, values, plan: KVPlan, options: dict):
    """Softmax attention as two batched matmuls, the query heads of one key head side by side (no repeat).

    query (B, H, q, d); keys, values (B, H_kv, S, d) -> (B, q, H, d)."""
    batch, heads, length, head_dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    scaling = options.get("scaling") or head_dim**-0.5
    grouped = query.reshape(batch, kv_heads, groups * length, head_dim)  # (B, H_kv, G*q, d)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling  # (B, H_kv, G*q, S)
    if options.get("softcap") is not None:
        scores = torch.tanh(scores / options["softcap"]) * options["softcap"]
    allowed = _allowed(plan, length, slots, options.get("sliding_window"), query.device)
    if allowed is not None:
        scores = scores.view(batch, kv_heads, groups, length, slots).masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).to(values.dtype).view(batch, kv_heads, groups * length, slots)
    out = torch.matmul(probs, values)  # (B, H_kv, G*q, d)
    return out.view(batch, heads, length, head_dim).transpose(1, 2), None


def _allowed(plan: KVPlan, length: int, slots: int, window: int | None, device):
    """Which slots each query sees, broadcastable to (B, H_kv, G, q, S); None when all of them."""
    if plan.first_query is None:  # one query a row, at the row's slot `write` (B,)
        allowed = plan.key_valid  # (B, S)
        if window is not None:
            allowed = allowed & (torch.arange(slots, device=device) > plan.write[:, None] - window)
        return allowed[:, None, None, None, :]
    last = plan.first_query + length - 1  # static slots, causal inside the window
    if last == slots - 1 and length == 1 and (window is None or window >= slots):
        return None
    kv_index = torch.arange(slots, device=device)
    q_index = torch.arange(plan.first_query, last + 1, device=device)[:, None]  # (q, 1)
    allowed = kv_index <= q_index
    if window is not None:
        allowed = allowed & (kv_index > q_index - window)
    return allowed  # (q, S)


def _original_attention(module, name: str):
    if name != "eager" and name in AttentionInterface._global_mapping:
        return AttentionInterface._global_mapping[name]
    return sys.modules[type(module).__module__].eager_attention_forward


@functools.lru_cache
def _prefill_implementation(original: str) -> str:
    """A registered name whose attention is `static_attention` and whose masks are `original`'s."""
    name = f"{STATIC_ATTENTION}_prefill_{original}"
    AttentionInterface.register(name, static_attention)
    masks = AttentionMaskInterface._global_mapping
    if original in masks:
        AttentionMaskInterface.register(name, masks[original])
    elif original != "eager":
        AttentionMaskInterface.register(name, masks["sdpa"])
    else:
        AttentionMaskInterface.register(name, masks["eager"])
    return name


AttentionInterface.register(STATIC_ATTENTION, static_attention)  # no mask function: transformers builds none


# -- the static engine skeleton ---------------------------------------------------------------------------


class StepGraphs:
    """Runs the engine's step functions: on CUDA each is captured once as a CUDA graph and replayed, all in one
    memory pool (they run one after another, and write their results into the engine's own buffers); on
    other devices, or with `enabled=False`, they are called.

    With `compile=True` each function is `torch.compile`d first (before the capture, on CUDA), so that the
    norms, rotary embeddings, casts and sampling fuse into fewer kernels; one graph per function, the
    visible-length buckets of a step sharing one dynamic-shape graph after the first. Random draws keep
    PyTorch's own kernels (`fallback_random`), which CUDA graphs replay with fresh numbers."""

    # engines of other shapes, and their buckets, recompile the same step functions: more than dynamo's default
    RECOMPILE_LIMIT = 64
    COMPILE_ARGUMENTS: ClassVar[dict] = {"options": {"fallback_random": True}}  # torch.compile's keyword arguments

    def __init__(self, device: torch.device, enabled: bool = True, compile: bool = False):
        self.enabled = enabled and device.type == "cuda"
        self.compile = compile
        self.device = device
        self.eager: dict = {}
        self.functions: dict = {}
        self.graphs: dict = {}
        self.pool = None
        if compile:
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
            setattr(config, name, max(getattr(config, name), self.RECOMPILE_LIMIT))

    def add(self, key, function):
        self.eager[key] = function
        self.functions[key] = torch.compile(function, **self.COMPILE_ARGUMENTS) if self.compile else function

    def capture(self):
        """Warm every function up, restore the RNG, capture (on CUDA).

        The warm-up runs each function eagerly first (lazy allocations: `StaticKV`'s buffers, library handles),
        then compiled, so that every compilation happens here: a compiled step traced before the buffers
        existed would recompile on its next call, inside the capture, which invalidates it. Without CUDA
        graphs the compiled warm-up still saves compiling that throwaway first version. The steps' state is
        reset by the engine's prefill."""
        if not (self.enabled or self.compile):
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for key in self.functions:
                self.eager[key]()
                if self.compile:
                    self.functions[key]()
            if self.enabled:
                torch.cuda.synchronize(self.device)
        if not self.enabled:
            return
        self.pool = torch.cuda.graph_pool_handle()
        for key, function in self.functions.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                function()
            self.graphs[key] = graph
        torch.cuda.synchronize(self.device)

    def run(self, key):
        if self.enabled:
            self.graphs[key].replay()
        else:
            self.functions[key]()


class DoneFlag:
    """The host's once-a-round look at `done` (a device bool): on CUDA it reads the previous round's value,
    copied without blocking, so that the device always has the next round queued."""

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        if self.lagged:
            self.host = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self.event = torch.cuda.Event()
            self.pending = False

    def all_done(self, done) -> bool:
        if not self.lagged:
            return bool(done)
        finished = False
        if self.pending:
            self.event.synchronize()
            finished = bool(self.host)
        self.host.copy_(done, non_blocking=True)
        self.event.record()
        self.pending = True
        return finished


def buckets(first: int, count: int, total: int, size: int = BUCKET) -> list[int]:
    """Visible lengths of `count` steps whose queries sit at slots first, first+1, ...: each slot + 1 rounded
    up to a multiple of `size`, at most `total`."""
    return [min(total, -(-(first + k + 1) // size) * size) for k in range(count)]


def capture_failed(error: BaseException) -> bool:
    """A CUDA graph could not be captured (an operation that synchronises with the host, say)."""
    return (
        isinstance(error, RuntimeError)
        and "captur" in str(error).lower()
        and not isinstance(error, torch.OutOfMemoryError)
    )


def parameters_key(model) -> tuple:
    """What a captured graph depends on besides shapes: where the weights live."""
    return tuple(p.data_ptr() for p in model.parameters())


@dataclass(frozen=True)
class EngineShape:
    """What a static engine's buffers and captured steps are built for."""

    batch: int  # rows
    slots: int  # cache slots a row
    visible: tuple[int, ...]  # the visible lengths (buckets) whose decoding steps are captured


_ENGINES = weakref.WeakKeyDictionary()  # model -> its last static engine (buffers and graphs kept for reuse)


def engine_of(model) -> "StaticEngine | None":
    """The static engine kept from `model`'s last fast generate call, if any."""
    return _ENGINES.get(model)


def release_engine(model) -> None:
    """Free the static engine kept for `model` now (its buffers and CUDA graphs)."""
    engine = _ENGINES.pop(model, None)
    if engine is not None:
        engine.close()


class StaticEngine:
    """Static buffers for one `EngineShape` and the step functions over them (see the module docstring).

    The base holds what every engine shares: the generated tokens and per-row counters, the step table
    (`StepGraphs`) with its capture, the round loop that watches the EOS flag, `close()`, and the generate
    wrapper (`generate`, `new_tokens`, `open`): it checks a call's settings, reuses the model's engine when
    its shape and rules fit, falls back to uncaptured steps when a capture fails and discards the engine on
    an error. A subclass allocates its own
    buffers and adds its steps in `__init__` (then calls `self.graphs.capture()`), and defines `lay_out`
    (a request's prompt, with its `shape`), `prefill(prompt, rows)`, `advance(visible)` (one round of steps:
    a block, or a token) and `rounds(prompt)` (the visible length of each round that generates a prompt's
    tokens). The host looks at the EOS flag after each round. A new engine's rows hold no prompt: they are
    finished until a prefill starts them.
    """

    def __init__(
        self, model, shape: EngineShape, rules: TokenRules, cuda_graphs: bool = True, compile_steps: bool = False
    ):
        self._model = weakref.ref(model)  # `_ENGINES` keeps the engine while the model lives: no strong ref back
        self.key = None  # set by `generate` to what the engine was built for
        self.shape, self.rules = shape, rules
        self.batch = batch = shape.batch
        self.device = device = next(model.parameters()).device
        long = {"dtype": torch.long, "device": device}
        self.rows = torch.arange(batch, **long)  # (B,) every row
        self.tokens = torch.full((batch, max(rules.max_new, 1)), rules.pad_id, **long)  # (B, max_new) generated
        self.produced = torch.zeros(batch, **long)  # (B,) tokens generated so far
        self.finished = torch.ones(batch, dtype=torch.bool, device=device)  # (B,) EOS generated, or no prompt
        self.live = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,) still generating: advances
        self.done = torch.ones((), dtype=torch.bool, device=device)  # no row live: the host's flag
        self.graphs = StepGraphs(device, cuda_graphs, compile_steps)

    @property
    def model(self):
        return self._model()

    # -- what a subclass defines ----------------------------------------------------------------------------

    @classmethod
    def lay_out(cls, model, request: GenerationRequest):
        """The request's prompt as this engine takes it; its `shape` is the engine's `EngineShape`."""
        raise NotImplementedError

    def prefill(self, prompt, rows: torch.Tensor | None = None):
        """Start `rows` (R,) (default: all) on the prompt's R rows; the other rows keep their state."""
        raise NotImplementedError

    def advance(self, visible: int | None):
        """One round of steps, whose decoding step attends over the first `visible` cache slots (one of the
        shape's buckets, covering every live row's write slot)."""
        raise NotImplementedError

    def rounds(self, prompt) -> list[int | None]:
        """The visible length of each round that generates `prompt`'s tokens."""
        raise NotImplementedError

    # -- the shared machinery -------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def generate(
        cls,
        model,
        input_ids,
        attention_mask=None,
        generation_config=None,
        cuda_graphs: bool = True,
        compile_steps: bool = False,
        **kwargs,
    ) -> torch.LongTensor:
        """Like `model.generate` (greedy or sampled, eos, min_new_tokens, left padding) on this engine; returns
        (B, T + max_new_tokens): exactly max_new_tokens per row, pad_token_id after a row's EOS."""
        request = GenerationRequest.of(model, input_ids, attention_mask, generation_config, kwargs)
        if request.rules.max_new == 0:
            return input_ids.clone()
        return torch.cat([input_ids, cls.new_tokens(model, request, cuda_graphs, compile_steps)], dim=1)

    @classmethod
    @torch.no_grad()
    def new_tokens(
        cls, model, request: GenerationRequest, cuda_graphs: bool = True, compile_steps: bool = False
    ) -> torch.Tensor:
        """(B, max_new) generated tokens; the model's engine is kept for the next call of the same shape and
        rules (`release_engine(model)` frees it) and discarded on an error."""
        prompt = cls.lay_out(model, request)
        key = (
            cls,
            prompt.shape,
            request.rules.key,
            request.input_ids.device,
            cuda_graphs,
            compile_steps,
            parameters_key(model),
        )
        engine = _ENGINES.get(model)
        if engine is None or engine.key != key:
            release_engine(model)  # free the old buffers before allocating new ones
            engine = cls.open(model, prompt.shape, request.rules, cuda_graphs, compile_steps)
            engine.key = key
            _ENGINES[model] = engine
        try:
            return engine.run(prompt)
        except Exception:
            release_engine(model)
            raise

    @classmethod
    @torch.no_grad()
    def open(
        cls, model, shape: EngineShape, rules: TokenRules, cuda_graphs: bool = True, compile_steps: bool = False
    ) -> "StaticEngine":
        """A new engine, its steps captured; if a capture fails, one whose steps run uncaptured (with a
        warning). Its buffers are freed at once if building it fails (out of memory in a batch sweep, say)."""
        try:
            return cls._built(model, shape, rules, cuda_graphs, compile_steps)
        except RuntimeError as error:
            if not (cuda_graphs and capture_failed(error)):
                raise
            warnings.warn(f"CUDA graph capture failed ({error}); running the static steps uncaptured", stacklevel=4)
            return cls._built(model, shape, rules, False, compile_steps)

    @classmethod
    def _built(cls, *arguments) -> "StaticEngine":
        engine = cls.__new__(cls)
        try:
            engine.__init__(*arguments)
        except BaseException:
            engine.close()
            raise
        return engine

    @torch.no_grad()
    def run(self, prompt) -> torch.Tensor:
        """Prefill every row with `prompt`, run its rounds until they end or no row is live -> (B, max_new)."""
        self.prefill(prompt)
        flag = DoneFlag(self.device) if self.rules.may_stop_early else None
        for visible in self.rounds(prompt):
            self.advance(visible)
            if flag is not None and flag.all_done(self.done):
                break
        return self.tokens[:, : self.rules.max_new].clone()

    def close(self) -> None:
        """Free the buffers and CUDA graphs now: the step functions refer back to the engine, so they would
        otherwise wait for the garbage collector. The engine cannot run afterwards."""
        reference = self.__dict__.get("_model")
        model = reference() if reference is not None else None
        if model is not None and _ENGINES.get(model) is self:
            del _ENGINES[model]
        self.__dict__.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()
        return False

    def start_rows(self, rows):
        """Reset the shared per-row state of `rows` (an index of the batch) for new prompts."""
        self.tokens[rows] = self.rules.pad_id
        self.produced[rows] = 0
        self.finished[rows] = False
        self.live[rows] = True
        self.done.fill_(False)

    def emit(self, logits, given=None, is_given=None):
        """Every row's next token (B,) from its logits (B, V), or its given token where `is_given` (B,); the
        generated ones are recorded."""
        chosen = self.rules.choose(logits, self.produced, self.finished)
        token = chosen if given is None else torch.where(is_given, given, chosen)
        self.rules.record(self.tokens, token, is_given, self.produced, self.finished, self.rows)
        return token

    def emit_rows(self, logits, rows: torch.Tensor):
        """`emit` for some rows (R,) of the batch, from their logits (R, V) (a prefill's first token)."""
        produced, finished = self.produced[rows], self.finished[rows]  # (R,) copies
        token = self.rules.choose(logits, produced, finished, rows=rows, batch=self.batch)
        self.rules.record(self.tokens, token, None, produced, finished, rows)
        self.produced[rows], self.finished[rows] = produced, finished
        return token

    def stop(self, rows):
        """End `rows` (an index of the batch) now, as if they had generated EOS: they stop moving."""
        self.finished[rows] = True
        self.live[rows] = False
        self.done.copy_(~self.live.any())

    def settle(self):
        """After a round's tokens: which rows are still live, and whether none is (`done`)."""
        torch.logical_and(~self.finished, self.produced < self.rules.limit(), out=self.live)
        self.done.copy_(~self.live.any())


# -- the block model's fast engine --------------------------------------------------------------------------


@dataclass
class BlockPrompt:
    """A left-padded prompt re-laid in blocks: row b's F whole blocks end together, its partial block after."""

    blocks: int  # F: prompt blocks, padding blocks included
    whole: torch.Tensor  # (B,) real whole blocks
    partial: torch.Tensor  # (B,) tokens of the trailing partial block
    block_ids: torch.Tensor  # (B, F*L)
    block_mask: torch.Tensor  # (B, F) 1 for a real block
    forced: torch.Tensor  # (B, L) the partial block's tokens, given in the first block step
    steps: int  # block steps that give every row max_new tokens

    @classmethod
    def lay_out(cls, input_ids, attention_mask, block_length: int, max_new: int) -> "BlockPrompt":
        length = input_ids.shape[1]
        device = input_ids.device
        real = attention_mask.sum(1)  # (B,)
        whole, partial = real // block_length, real % block_length  # (B,), (B,)
        blocks = int(whole.max())

        # Row b's whole blocks end at block `blocks`; its partial block comes after.
        first_real = length - real  # (B,)
        slot = torch.arange(blocks * block_length, device=device)  # (F*L,)
        k = slot[None] - (blocks - whole)[:, None] * block_length  # (B, F*L) index among the row's real tokens
        block_ids = input_ids.gather(1, (first_real[:, None] + k.clamp(min=0)).clamp(max=length - 1))
        inside = torch.arange(block_length, device=device)[None]  # (1, L)
        k_partial = whole[:, None] * block_length + inside  # (B, L)
        forced = input_ids.gather(1, (first_real[:, None] + k_partial).clamp(max=length - 1))  # (B, L)
        block_mask = (torch.arange(blocks, device=device)[None] >= (blocks - whole)[:, None]).long()  # (B, F)
        steps = -(-(max_new + int(partial.max())) // block_length)
        return cls(blocks, whole, partial, block_ids, block_mask, forced, steps)

    @property
    def slots(self) -> int:
        """Block-cache slots a row needs: the prompt's blocks, then one a block step."""
        return max(self.blocks + self.steps - 1, 1)

    @property
    def visible(self) -> list[int]:
        """The visible length of each block step."""
        return buckets(self.blocks, self.steps - 1, self.slots)

    @property
    def shape(self) -> EngineShape:
        return EngineShape(len(self.whole), self.slots, tuple(sorted(set(self.visible))))


class BlockEngine(StaticEngine):
    """The block model's fast engine.

    Slots of the block decoder's cache, per row: [0, F) the prompt's blocks (padding blocks masked), then one
    a block step, the same layout as the eager engine's cache, so that sliding windows count the same slots.
    Per-row state: `write_slot` and `block_position` (where its next block goes, and its position id),
    `key_valid` (its valid slots), `context`, `forced`/`n_forced` (its given tokens), and the base's counters.
    """

    def __init__(
        self, model, shape: EngineShape, rules: TokenRules, cuda_graphs: bool = True, compile_steps: bool = False
    ):
        super().__init__(model, shape, rules, cuda_graphs, compile_steps)
        config = model.config
        self.block_length, self.prefix_length = config.block_length, config.prefix_length
        batch, device = shape.batch, self.device
        self.block_kv = StaticKV(config.block_decoder.num_hidden_layers, batch, shape.slots)
        self.token_kv = StaticKV(
            config.token_decoder.num_hidden_layers, batch, self.prefix_length + self.block_length - 1
        )
        long = {"dtype": torch.long, "device": device}
        self.context = torch.zeros(batch, model.start_context.shape[0], dtype=model.start_context.dtype, device=device)
        self.key_valid = torch.zeros(batch, shape.slots, dtype=torch.bool, device=device)  # (B, S)
        self.write_slot = torch.zeros(batch, **long)  # (B,) each row's next block-cache slot
        self.block_position = torch.zeros(batch, 1, **long)  # (B, 1) each row's next block position id
        self.forced = torch.zeros(batch, self.block_length, **long)  # (B, L)
        self.n_forced = torch.zeros(batch, **long)  # (B,)
        self.block = torch.zeros(batch, self.block_length, **long)  # (B, L) the block just decoded
        window = model.window_position_ids(device)[None].expand(batch, -1)  # (B, r+L-1)
        r = self.prefix_length
        self.token_positions = [window[:, :r]] + [window[:, r + i - 1 : r + i] for i in range(1, self.block_length)]
        self.graphs.add("token block", self.token_block)
        for visible in shape.visible:
            self.graphs.add(("block step", visible), functools.partial(self.block_step, visible))
        self.graphs.capture()

    @classmethod
    def lay_out(cls, model, request: GenerationRequest) -> BlockPrompt:
        return BlockPrompt.lay_out(
            request.input_ids, request.attention_mask, model.config.block_length, request.rules.max_new
        )

    def advance(self, visible: int | None):
        """A token block, then (unless `visible` is None: a prompt's last block) a block step."""
        self.graphs.run("token block")
        if visible is not None:
            self.graphs.run(("block step", visible))

    def rounds(self, prompt: BlockPrompt) -> list[int | None]:
        return prompt.visible + [None]

    @torch.no_grad()
    def prefill(self, prompt: BlockPrompt, rows: torch.Tensor | None = None):
        """Start `rows` (default: all) on `prompt`: their state reset, the block decoder over their whole blocks
        into their rows of the cache, their context for the next token block."""
        model = self.model
        index = slice(None) if rows is None else rows
        self.start_rows(index)
        real = prompt.block_mask.bool()  # (R, F)
        self.key_valid[index] = False
        self.key_valid[index, : prompt.blocks] = real
        self.write_slot[index] = prompt.blocks
        self.block_position[index] = prompt.whole[:, None]
        self.forced[index] = prompt.forced
        self.n_forced[index] = prompt.partial
        start = model.start_context[None].expand(len(prompt.whole), -1)  # (R, D)
        if not prompt.blocks:
            self.context[index] = start
            return
        original = model.block_decoder.config._attn_implementation
        plan = KVPlan(
            self.block_kv, slice(0, prompt.blocks), prompt.blocks, prefill=original, rows=rows, write_valid=real
        )
        hidden = run_with_plan(
            model.block_decoder,
            plan,
            inputs_embeds=model.embed_blocks(prompt.block_ids),
            attention_mask=prompt.block_mask,
            position_ids=(prompt.block_mask.cumsum(1) - 1).clamp(min=0),
        ).last_hidden_state  # (R, F, D)
        self.context[index] = torch.where(prompt.whole[:, None] > 0, hidden[:, -1], start).to(self.context.dtype)

    def token_block(self):
        """The token decoder's L steps from `context`: tokens into `block`, generated ones into `tokens`."""
        model = self.model
        r = self.prefix_length
        embeds = model.prefix_inputs(self.context)  # (B, r, D)
        for i in range(self.block_length):
            write = slice(0, r) if i == 0 else slice(r + i - 1, r + i)
            plan = KVPlan(self.token_kv, write, visible=write.stop, first_query=write.start)
            logits = run_with_plan(
                model.token_decoder,
                plan,
                inputs_embeds=embeds,
                position_ids=self.token_positions[i],
                logits_to_keep=1,
            ).logits[:, -1]  # (B, V)
            token = self.emit(logits, given=self.forced[:, i], is_given=i < self.n_forced)  # (B,)
            self.block[:, i] = token
            if i + 1 < self.block_length:
                embeds = model.token_decoder.get_input_embeddings()(token[:, None])  # (B, 1, D)
        self.n_forced.zero_()  # a row's given tokens come in its first block only
        self.settle()

    def block_step(self, visible: int):
        """Embed `block`; one block-decoder step, each row at its `write_slot`, over the first `visible` slots
        -> `context`. Live rows move on by one slot and position."""
        model = self.model
        self.key_valid.scatter_(1, self.write_slot[:, None], True)
        plan = KVPlan(self.block_kv, self.write_slot, visible, key_valid=self.key_valid[:, :visible])
        hidden = run_with_plan(
            model.block_decoder,
            plan,
            inputs_embeds=model.embed_blocks(self.block),
            position_ids=self.block_position,
        ).last_hidden_state  # (B, 1, D)
        self.context.copy_(hidden[:, -1])
        self.write_slot += self.live
        self.block_position += self.live[:, None]


# -- the block model's generate() -------------------------------------------------------------------------


@dataclass
class _ActiveRows:
    """The eager engine's rows still generating: their index in the batch, tokens so far, whether EOS came."""

    index: torch.Tensor  # (A,)
    produced: torch.Tensor  # (A,)
    finished: torch.Tensor  # (A,)

    def select(self, keep: torch.Tensor) -> "_ActiveRows":
        return _ActiveRows(self.index[keep], self.produced[keep], self.finished[keep])


class BlockGenerationMixin:
    """`generate()` with the keyword arguments transformers users know."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        engine: str = "auto",
        cuda_graphs: bool = True,
        compile_steps: bool = False,
        **kwargs,
    ) -> torch.LongTensor:
        """Returns (B, T + max_new_tokens): the prompt as given, then exactly max_new_tokens per row,
        with pad_token_id after a row's EOS (as transformers pads).

        engine: "fast" (static caches; CUDA graphs on CUDA unless cuda_graphs=False), "eager" (dynamic caches,
        finished rows leave the batch; the only one that streams), or "auto": fast on CUDA, else eager. Both
        give the same tokens. The fast engine keeps its buffers and graphs for the next call of the same
        shape; `release_generation_engine()` frees them. compile_steps: the fast engine's step functions
        go through `torch.compile` first (fewer, fused kernels; compiling takes a minute or more).
        """
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        request = GenerationRequest.of(self, input_ids, attention_mask, generation_config, kwargs)
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("a streamer works with batch size 1 only")
        if streamer is not None and engine == "fast":
            raise ValueError("the fast engine does not stream: use engine='eager'")
        if request.rules.max_new == 0:
            return input_ids.clone()
        chosen = engine
        if engine == "auto":
            chosen = "fast" if input_ids.device.type == "cuda" and streamer is None else "eager"
        if chosen == "fast":
            try:
                return torch.cat([input_ids, BlockEngine.new_tokens(self, request, cuda_graphs, compile_steps)], dim=1)
            except Unsupported as error:
                if engine == "fast":
                    raise
                warnings.warn(f"fast generation unavailable ({error}); generating eagerly", stacklevel=3)
        return torch.cat([input_ids, self._generate_eager(request, streamer)], dim=1)

    def release_generation_engine(self) -> None:
        """Free the fast engine's buffers and CUDA graphs kept from the last generate() call."""
        release_engine(self)

    # -- eager engine -------------------------------------------------------------------------------------

    def _generate_eager(self, request: GenerationRequest, streamer) -> torch.Tensor:
        """(B, max_new) tokens with dynamic caches; rows that are done leave the batch between blocks."""
        input_ids, rules = request.input_ids, request.rules
        batch = input_ids.shape[0]
        device = input_ids.device
        prompt = BlockPrompt.lay_out(input_ids, request.attention_mask, self.config.block_length, rules.max_new)
        if streamer is not None:
            streamer.put(input_ids.cpu())

        # Prefill: the block decoder alone over whole blocks.
        block_mask, forced, n_forced = prompt.block_mask, prompt.forced, prompt.partial
        block_cache = DynamicCache(config=self.config.block_decoder)
        cache_arg = cache_argument(self.block_decoder)
        start = self.start_context[None].expand(batch, -1)  # (B, D)
        context = start
        if prompt.blocks:
            positions = (block_mask.cumsum(1) - 1).clamp(min=0)
            hidden = self.block_decoder(
                inputs_embeds=self.embed_blocks(prompt.block_ids),
                attention_mask=block_mask,
                position_ids=positions,
                use_cache=True,
                **{cache_arg: block_cache},
            ).last_hidden_state  # (B, F, D)
            context = torch.where(prompt.whole[:, None] > 0, hidden[:, -1], start)

        rows = _ActiveRows(
            index=torch.arange(batch, device=device),
            produced=torch.zeros(batch, dtype=torch.long, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        tokens = torch.full((batch, rules.max_new), rules.pad_id, dtype=torch.long, device=device)
        for step in range(prompt.steps):
            block = self._decode_block(context, forced, n_forced, rows, rules, tokens, streamer)  # (A, L)
            if step == prompt.steps - 1:
                break
            done = rows.finished | (rows.produced >= rules.max_new)  # (A,)
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
                inputs_embeds=self.embed_blocks(block),
                attention_mask=block_mask,
                position_ids=position,
                use_cache=True,
                **{cache_arg: block_cache},
            ).last_hidden_state  # (A, 1, D)
            context = hidden[:, -1]
            n_forced = torch.zeros_like(rows.produced)
        if streamer is not None:
            streamer.end()
        return tokens

    def _decode_block(self, context, forced, n_forced, rows: _ActiveRows, rules: TokenRules, tokens, streamer):
        """The token decoder's L steps for one block; generated tokens go into `tokens` (B, max_new).

        context (A, D) for the A active rows; forced (A, L) given tokens, used where position < n_forced (A,).
        Returns the block's tokens (A, L).
        """
        active = context.shape[0]
        block_length, r = self.config.block_length, self.config.prefix_length
        positions = self.window_position_ids(context.device)[None].expand(active, -1)  # (A, r+L-1)
        cache = DynamicCache(config=self.config.token_decoder)
        cache_arg = cache_argument(self.token_decoder)
        embeds = self.prefix_inputs(context)  # (A, r, D)
        step_positions = positions[:, :r]
        block = []
        for i in range(block_length):
            logits = self.token_decoder(
                inputs_embeds=embeds,
                position_ids=step_positions,
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            ).logits[:, -1]  # (A, V)
            chosen = rules.choose(logits, rows.produced, rows.finished, rows=rows.index, batch=tokens.shape[0])
            is_given = i < n_forced  # (A,)
            token = torch.where(is_given, forced[:, i], chosen)  # (A,)
            writes = rules.record(tokens, token, is_given, rows.produced, rows.finished, rows.index)
            if streamer is not None and bool(writes[0]):
                streamer.put(token.cpu())
            block.append(token)
            if i + 1 < block_length:
                embeds = self.token_decoder.get_input_embeddings()(token[:, None])  # (A, 1, D)
                step_positions = positions[:, r + i : r + i + 1]
        return torch.stack(block, dim=1)
