"""Block-cached generation for the Block Transformer (DESIGN.md §1 "Generation", contract 5).

Shipped next to every saved model with the modeling file; imports only torch and transformers.

    prefill: the prompt's whole blocks go through the block decoder only (its cache: one position a block)
    per block: the token decoder, with a cache of at most r + L positions, emits L tokens from the
               current context (the prompt's trailing partial block is fed as given tokens);
               the finished block is embedded and one block-decoder step yields the next context.

Rows of a left-padded batch are re-laid so that each row's first real token starts a block and all rows'
whole blocks end together; the first block step completes every row's partial block, its given tokens
forced, and from then on all rows run in lockstep.

Two engines run that loop, with the same token rules (`choose_tokens`) and the same results:

- eager: transformers' dynamic caches, a Python loop, finished rows dropped between blocks (CPU default).
- fast (`_BlockEngine`, the CUDA default): every buffer preallocated for the whole batch and length -- the
  block decoder's keys and values (B, H_kv, prompt blocks + steps, d), the token decoder's window
  (B, H_kv, r + L - 1, d), tokens, positions, EOS flags -- and each step a function of those buffers
  with fixed shapes and no host synchronisation: one "token block" (the L token-decoder steps with sampling,
  EOS and min_new_tokens on the device) and one "block step" per visible-length bucket. On CUDA each is
  captured once as a CUDA graph (`StepGraphs`) and replayed; elsewhere the same functions run eagerly. The
  host looks at one flag a block (a block late, so the device never waits) to stop when every row is done.

How the fast engine runs the decoders: it calls their own transformers modules (any family), with
`use_cache=False`, explicit position ids and their attention implementation switched to `block_static`, a
function registered with transformers' `AttentionInterface`. That function receives each layer's new keys
and values after the family's own projections, rotary embedding and norms, writes them into the static
buffers at the slots the engine planned (`_Plan`), and attends over the buffers with plain batched
matmuls (grouped-query heads without repeating keys). The prompt's prefill writes the buffers the same way
but delegates the attention to the decoder's own implementation, so the prefill is numerically the eager
path's. Only `AttentionInterface` and the attention-function signature are relied on, which 5.17 and 5.24
share; transformers' StaticCache is not used because its update signature changed between those releases
and its masks are built by transformers on every call.
"""

import copy
import functools
import inspect
import sys
import warnings
import weakref
from dataclasses import dataclass, field

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
STATIC_ATTENTION = "block_static"  # decoding steps: attention over the static buffers, no mask built
BUCKET = 32  # the block step attends over the first k * BUCKET cache slots; one captured graph per k


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


# -- token rules, shared by both engines --------------------------------------------------------------------


def choose_tokens(logits, warpers, eos, min_new: int, produced, finished, pad_id: int, rows=None, sample=None):
    """The next token of every row: (A, V) logits -> (A,).

    `logits` may be in the model's dtype and are changed in place (callers pass a fresh tensor). Greedy picks
    from them as they are, the token an exact float32 upcast would give, without a float32 copy of the
    logits; sampling works in float32. EOS is blocked while a row has fewer than `min_new` tokens. Sampling
    (`sample`; by default when `warpers` is not empty) draws from the warped softmax by the exponential race
    argmax(p / E), E ~ Exp(1), which has the same distribution as `torch.multinomial` and needs no host
    synchronisation; finished rows get `pad_id`. `rows` = (B, index): the A rows are these of a batch of B;
    the draws are made for all B rows, so that the generator advances the same whichever rows are left, and
    both engines draw the same numbers for a row.
    """
    if len(eos) and min_new:
        early = (produced < min_new)[:, None]  # (A, 1)
        logits.index_copy_(1, eos, torch.where(early, float("-inf"), logits.index_select(1, eos)))
    if sample if sample is not None else bool(warpers):
        logits = logits.float()
        probs = torch.softmax(warpers(None, logits) if warpers else logits, dim=-1)
        if rows is None:
            race = torch.empty_like(probs).exponential_()
        else:
            race = probs.new_empty(rows[0], probs.shape[1]).exponential_()[rows[1]]
        race = race.clamp_(min=torch.finfo(probs.dtype).tiny)
        chosen = (probs / race).argmax(-1)
    else:
        chosen = logits.argmax(-1)
    return torch.where(finished, pad_id, chosen)


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


def generation_settings(model, generation_config, kwargs) -> GenerationConfig:
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    settings = copy.deepcopy(base)
    unused = settings.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(sorted(unused))}")
    return settings


@dataclass
class TokenRules:
    """What decides and records the generated tokens of one generate call."""

    max_new: int
    eos: torch.Tensor  # (E,) long
    pad_id: int
    min_new: int
    warpers: LogitsProcessorList
    sample: bool  # do_sample: draw from the warped softmax, else argmax
    key: tuple  # everything above that a captured graph bakes in

    @classmethod
    def from_settings(cls, settings: GenerationConfig, prompt_length: int, device) -> "TokenRules":
        max_new = settings.max_new_tokens
        if max_new is None:
            max_new = max(settings.max_length - prompt_length, 0) if settings.max_length else 20
        eos_ids = _token_ids(settings.eos_token_id)
        pad_id = settings.pad_token_id if settings.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        min_new = settings.min_new_tokens or 0
        warpers = make_warpers(settings)
        sample = bool(settings.do_sample)
        sampling = (settings.temperature, settings.top_k, settings.top_p) if sample else None
        eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
        key = (max_new, tuple(eos_ids), int(pad_id), min_new, sample, sampling)
        return cls(max_new, eos, int(pad_id), min_new, warpers, sample, key)

    def record(self, tokens, token, is_given, produced, finished):
        """Write each row's token into `tokens` (B, max_new) at the row's next column unless it was given or the
        row is full; update `finished` (EOS) and `produced` in place. Rows are all of `tokens`' rows."""
        writes = ~is_given & (produced < self.max_new)  # (B,)
        column = produced.clamp(max=self.max_new - 1)[:, None]  # (B, 1)
        tokens.scatter_(1, column, torch.where(writes[:, None], token[:, None], tokens.gather(1, column)))
        if len(self.eos):
            finished |= writes & (token[:, None] == self.eos).any(-1)
        produced += writes.long()


# -- the static-cache machinery, shared with the vanilla engine in `uptrain bench` ---------------------------


class StaticKV:
    """Preallocated keys and values of one decoder: per layer (B, H_kv, length, d), allocated at the first
    write (their head count and size are the attention module's, whatever the family)."""

    def __init__(self, layers: int, batch: int, length: int):
        self.batch, self.length = batch, length
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def write(self, layer: int, key, value, plan: "_Plan"):
        if self.keys[layer] is None:
            shape = (self.batch, key.shape[1], self.length, key.shape[3])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        keys, values = self.keys[layer], self.values[layer]
        if plan.write_valid is not None:  # prefill: padding slots hold zeros, never a NaN that a mask would not stop
            keep = plan.write_valid[:, None, :, None]
            key, value = torch.where(keep, key, 0), torch.where(keep, value, 0)
        if isinstance(plan.write, slice):
            keys[:, :, plan.write] = key
            values[:, :, plan.write] = value
        else:  # a (1,) device index: the slot moves from step to step inside one captured graph
            keys.index_copy_(2, plan.write, key)
            values.index_copy_(2, plan.write, value)
        return keys, values


@dataclass
class _Plan:
    """What `static_attention` does in the decoder call in progress."""

    kv: StaticKV
    write: slice | torch.Tensor  # the slots of this call's keys: a slice, or a (1,) device index
    visible: int  # queries attend to slots [0, visible)
    first_query: int | None = None  # slot of the first query when static; None: the query is at `write`
    key_valid: torch.Tensor | None = None  # (B, visible) bool: False for padding slots
    prefill: str | None = None  # the decoder's own attention implementation, which a prefill delegates to
    write_valid: torch.Tensor | None = None  # (B, written) bool: slots to zero on writing (prefill padding)
    seen: set = field(default_factory=set)


class _Active:
    plan: _Plan | None = None


_ACTIVE = _Active()


class Unsupported(RuntimeError):
    """The fast engine cannot run this architecture (a layer does not go through the attention interface)."""


@dataclass
class planned:
    """Context: run one decoder with `plan`, its attention switched to the static function, and check that
    every layer went through it."""

    decoder: torch.nn.Module
    plan: _Plan

    def __enter__(self):
        self.saved = (_ACTIVE.plan, self.decoder.config._attn_implementation)
        if str(self.saved[1]).startswith(STATIC_ATTENTION):
            raise RuntimeError("nested static-cache decoder calls")
        _ACTIVE.plan = self.plan
        if self.plan.prefill is not None:
            self.decoder.config._attn_implementation = _prefill_implementation(self.plan.prefill)
        else:
            self.decoder.config._attn_implementation = STATIC_ATTENTION
        return self.plan

    def __exit__(self, kind, value, traceback):
        _ACTIVE.plan, self.decoder.config._attn_implementation = self.saved
        if kind is None:
            layers = self.decoder.config.num_hidden_layers
            if self.plan.seen != set(range(layers)):
                raise Unsupported(
                    f"{type(self.decoder).__name__}: {len(self.plan.seen)} of {layers} layers went through the "
                    "attention interface; use generate(engine='eager')"
                )
        return False


def static_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: query (B, H, q, d), this call's key and value (B, H_kv, q, d)
    -> ((B, q, H, d), None). Writes key and value into the active plan's buffers, then attends over them."""
    plan = _ACTIVE.plan
    if plan is None:
        raise RuntimeError(f"{STATIC_ATTENTION} attention runs inside the static generation engine only")
    layer = module.layer_idx
    plan.seen.add(layer)
    keys, values = plan.kv.write(layer, key, value, plan)
    if plan.prefill is not None:
        return _original_attention(module, plan.prefill)(module, query, key, value, attention_mask, **kwargs)
    return _attend(query, keys[:, :, : plan.visible], values[:, :, : plan.visible], plan, kwargs)


def _attend(query, keys, values, plan: _Plan, options: dict):
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


def _allowed(plan: _Plan, length: int, slots: int, window: int | None, device):
    """Which slots each query sees, broadcastable to (B, H_kv, G, q, S); None when all of them."""
    if plan.first_query is None:  # the block step: one query at slot `write`
        allowed = plan.key_valid  # (B, S)
        if window is not None:
            allowed = allowed & (torch.arange(slots, device=device) > plan.write - window)
        return allowed[:, None, None, None, :]
    last = plan.first_query + length - 1  # the token decoder: static slots, causal inside the window
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
    COMPILE_ARGUMENTS = {"options": {"fallback_random": True}}  # torch.compile's keyword arguments

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
    """The host's once-a-block look at `done` (a device bool): on CUDA it reads the previous block's value,
    copied without blocking, so that the device always has the next block queued."""

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


def discard(engines: weakref.WeakKeyDictionary, model) -> None:
    """Forget `model`'s engine now: its step functions and graphs refer back to it, so its buffers would
    otherwise wait for the garbage collector."""
    engine = engines.pop(model, None)
    if engine is not None:
        engine.__dict__.clear()


def build_engine(cls, *args):
    """`cls(*args)`, its buffers freed at once if building fails (an out-of-memory error in a batch sweep)."""
    engine = cls.__new__(cls)
    try:
        engine.__init__(*args)
    except BaseException:
        engine.__dict__.clear()
        raise
    return engine


def capture_failed(error: BaseException) -> bool:
    """A CUDA graph could not be captured (an operation that synchronises with the host, say)."""
    return isinstance(error, RuntimeError) and "captur" in str(error).lower() and not isinstance(error, torch.OutOfMemoryError)


def parameters_key(model) -> tuple:
    """What a captured graph depends on besides shapes: where the weights live."""
    return tuple(p.data_ptr() for p in model.parameters())


# -- the block model's generate() -------------------------------------------------------------------------


@dataclass
class _Prompt:
    """A left-padded prompt re-laid in blocks: row b's F whole blocks end together, its partial block after."""

    blocks: int  # F: prompt blocks, padding blocks included
    whole: torch.Tensor  # (B,) real whole blocks
    partial: torch.Tensor  # (B,) tokens of the trailing partial block
    block_ids: torch.Tensor  # (B, F*L)
    block_mask: torch.Tensor  # (B, F) 1 for a real block
    forced: torch.Tensor  # (B, L) the partial block's tokens, given in the first block step
    steps: int  # block steps that give every row max_new tokens


_ENGINES = weakref.WeakKeyDictionary()  # model -> its last fast engine (buffers and graphs kept for reuse)


class BlockGenerationMixin:
    """`generate()` with the keyword arguments transformers users know."""

    def _generation_settings(self, generation_config, kwargs) -> GenerationConfig:
        return generation_settings(self, generation_config, kwargs)

    def _warpers(self, settings: GenerationConfig) -> LogitsProcessorList:
        return make_warpers(settings)

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
        settings = self._generation_settings(generation_config, kwargs)
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("generate() needs left padding: every row's last position must be a real token")
        if streamer is not None and batch > 1:
            raise ValueError("a streamer works with batch size 1 only")
        if streamer is not None and engine == "fast":
            raise ValueError("the fast engine does not stream: use engine='eager'")
        rules = TokenRules.from_settings(settings, length, device)
        if rules.max_new == 0:
            return input_ids.clone()
        prompt = self._lay_out_prompt(input_ids, attention_mask, rules.max_new)
        chosen = engine
        if engine == "auto":
            chosen = "fast" if device.type == "cuda" and streamer is None else "eager"
        if chosen == "fast":
            try:
                return self._generate_fast(input_ids, prompt, rules, cuda_graphs, compile_steps)
            except Unsupported as error:
                if engine == "fast":
                    raise
                warnings.warn(f"fast generation unavailable ({error}); generating eagerly", stacklevel=3)
        return self._generate_eager(input_ids, prompt, rules, streamer)

    def release_generation_engine(self) -> None:
        """Free the fast engine's buffers and CUDA graphs kept from the last generate() call."""
        discard(_ENGINES, self)

    def _lay_out_prompt(self, input_ids, attention_mask, max_new: int) -> _Prompt:
        length = input_ids.shape[1]
        device = input_ids.device
        block_length = self.config.block_length
        real = attention_mask.sum(1)  # (B,)
        whole, partial = real // block_length, real % block_length  # (B,), (B,)
        blocks = int(whole.max())

        # Prompt re-laid in blocks: row b's whole blocks end at block `blocks`; its partial block comes after.
        first_real = length - real  # (B,)
        slot = torch.arange(blocks * block_length, device=device)  # (F*L,)
        k = slot[None] - (blocks - whole)[:, None] * block_length  # (B, F*L) index among the row's real tokens
        block_ids = input_ids.gather(1, (first_real[:, None] + k.clamp(min=0)).clamp(max=length - 1))
        inside = torch.arange(block_length, device=device)[None]  # (1, L)
        k_partial = whole[:, None] * block_length + inside  # (B, L)
        forced = input_ids.gather(1, (first_real[:, None] + k_partial).clamp(max=length - 1))  # (B, L)
        block_mask = (torch.arange(blocks, device=device)[None] >= (blocks - whole)[:, None]).long()  # (B, F)
        steps = -(-(max_new + int(partial.max())) // block_length)
        return _Prompt(blocks, whole, partial, block_ids, block_mask, forced, steps)

    # -- eager engine -------------------------------------------------------------------------------------

    def _generate_eager(self, input_ids, prompt: _Prompt, rules: TokenRules, streamer) -> torch.LongTensor:
        batch = input_ids.shape[0]
        device = input_ids.device
        if streamer is not None:
            streamer.put(input_ids.cpu())

        # Prefill: the block decoder alone over whole blocks.
        blocks, whole = prompt.blocks, prompt.whole
        block_mask, forced, n_forced = prompt.block_mask, prompt.forced, prompt.partial
        block_cache = DynamicCache(config=self.config.block_decoder)
        cache_arg = _cache_argument(self.block_decoder)
        start = self.start_context[None].expand(batch, -1)  # (B, D)
        context = start
        if blocks:
            positions = (block_mask.cumsum(1) - 1).clamp(min=0)
            hidden = self.block_decoder(
                inputs_embeds=self.embed_blocks(prompt.block_ids), attention_mask=block_mask, position_ids=positions,
                use_cache=True, **{cache_arg: block_cache},
            ).last_hidden_state  # (B, F, D)
            context = torch.where(whole[:, None] > 0, hidden[:, -1], start)

        rows = _ActiveRows(
            index=torch.arange(batch, device=device),
            produced=torch.zeros(batch, dtype=torch.long, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
        )
        output = _Output(torch.full((batch, rules.max_new), rules.pad_id, dtype=torch.long, device=device), rules, streamer)
        for step in range(prompt.steps):
            block = self._decode_block(context, forced, n_forced, rows, output)  # (A, L) for A active rows
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
            ).logits[:, -1]  # (A, V)
            token = output.choose(logits, rows, forced[:, i], is_given=i < n_forced)  # (A,)
            block.append(token)
            if i + 1 < block_length:
                embeds = self.token_decoder.get_input_embeddings()(token[:, None])  # (A, 1, D)
                step_positions = positions[:, r + i : r + i + 1]
        return torch.stack(block, dim=1)

    # -- fast engine --------------------------------------------------------------------------------------

    def _generate_fast(self, input_ids, prompt: _Prompt, rules: TokenRules, cuda_graphs: bool,
                       compile_steps: bool = False) -> torch.LongTensor:
        batch, device = input_ids.shape[0], input_ids.device
        key = (batch, prompt.blocks, prompt.steps, rules.key, device, cuda_graphs, compile_steps, parameters_key(self))
        engine = _ENGINES.get(self)
        if engine is None or engine.key != key:
            discard(_ENGINES, self)  # free the old buffers before allocating new ones
            arguments = (self, key, batch, prompt.blocks, prompt.steps, rules)
            try:
                engine = build_engine(_BlockEngine, *arguments, cuda_graphs, compile_steps)
            except RuntimeError as error:
                if not (cuda_graphs and capture_failed(error)):
                    raise
                warnings.warn(f"CUDA graph capture failed ({error}); running the static steps uncaptured", stacklevel=3)
                engine = build_engine(_BlockEngine, *arguments, False, compile_steps)
            _ENGINES[self] = engine
        try:
            tokens = engine.generate(prompt, rules)
        except Exception:
            discard(_ENGINES, self)
            raise
        return torch.cat([input_ids, tokens], dim=1)


class _BlockEngine:
    """Static buffers for one batch shape, and the step functions over them (see the module docstring).

    Slots of the block decoder's cache: [0, F) the prompt's blocks (padding blocks masked), then one a block
    step, the same layout as the eager engine's cache, so that sliding windows count the same slots.
    """

    def __init__(self, model, key, batch: int, blocks: int, steps: int, rules: TokenRules, cuda_graphs: bool,
                 compile_steps: bool = False):
        self._model = weakref.ref(model)  # `_ENGINES` keeps the engine while the model lives: no strong ref back
        self.key = key
        config = model.config
        self.block_length, self.prefix_length = config.block_length, config.prefix_length
        device = next(model.parameters()).device
        self.batch, self.blocks, self.steps, self.rules = batch, blocks, steps, rules
        self.slots = max(blocks + steps - 1, 1)
        self.block_kv = StaticKV(config.block_decoder.num_hidden_layers, batch, self.slots)
        self.token_kv = StaticKV(config.token_decoder.num_hidden_layers, batch, self.prefix_length + self.block_length - 1)
        dim = model.start_context.shape[0]
        long = {"dtype": torch.long, "device": device}
        self.context = torch.zeros(batch, dim, dtype=model.start_context.dtype, device=device)  # (B, D)
        self.key_valid = torch.zeros(batch, self.slots, dtype=torch.bool, device=device)  # (B, S)
        self.write_slot = torch.zeros(1, **long)  # the block step's slot
        self.block_position = torch.zeros(batch, 1, **long)  # (B, 1) the block step's position id
        self.forced = torch.zeros(batch, self.block_length, **long)  # (B, L)
        self.n_forced = torch.zeros(batch, **long)  # (B,)
        self.produced = torch.zeros(batch, **long)  # (B,)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
        self.tokens = torch.zeros(batch, max(rules.max_new, 1), **long)  # (B, max_new)
        self.block = torch.zeros(batch, self.block_length, **long)  # (B, L) the block just decoded
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        window = model.window_position_ids(device)[None].expand(batch, -1)  # (B, r+L-1)
        r = self.prefix_length
        self.token_positions = [window[:, :r]] + [window[:, r + i - 1 : r + i] for i in range(1, self.block_length)]
        self.block_visible = buckets(blocks, steps - 1, self.slots)
        self.graphs = StepGraphs(device, cuda_graphs, compile_steps)
        self.graphs.add("token block", self.token_block)
        for visible in sorted(set(self.block_visible)):
            self.graphs.add(("block step", visible), functools.partial(self.block_step, visible))
        self.graphs.capture()

    @property
    def model(self):
        return self._model()

    def generate(self, prompt: _Prompt, rules: TokenRules) -> torch.Tensor:
        """(B, max_new) generated tokens. `rules` has this engine's key; the engine keeps using its own copy,
        whose tensors the captured graphs read."""
        self.prefill(prompt)
        flag = DoneFlag(self.context.device) if len(rules.eos) and rules.min_new < rules.max_new else None
        for step in range(self.steps):
            self.graphs.run("token block")
            if step == self.steps - 1:
                break
            self.graphs.run(("block step", self.block_visible[step]))
            if flag is not None and flag.all_done(self.done):
                break
        return self.tokens[:, : rules.max_new].clone()

    def prefill(self, prompt: _Prompt):
        """Reset every buffer for a new prompt; the block decoder over the prompt's whole blocks."""
        model = self.model
        self.key_valid.zero_()
        self.write_slot.fill_(prompt.blocks)
        self.block_position.copy_(prompt.whole[:, None])
        self.forced.copy_(prompt.forced)
        self.n_forced.copy_(prompt.partial)
        self.produced.zero_()
        self.finished.zero_()
        self.tokens.fill_(self.rules.pad_id)
        self.done.zero_()
        start = model.start_context[None].expand(self.batch, -1)  # (B, D)
        if not prompt.blocks:
            self.context.copy_(start)
            return
        real = prompt.block_mask.bool()
        self.key_valid[:, : prompt.blocks] = real
        original = model.block_decoder.config._attn_implementation
        plan = _Plan(self.block_kv, slice(0, prompt.blocks), prompt.blocks, prefill=original, write_valid=real)
        with planned(model.block_decoder, plan):
            hidden = model.block_decoder(
                inputs_embeds=model.embed_blocks(prompt.block_ids), attention_mask=prompt.block_mask,
                position_ids=(prompt.block_mask.cumsum(1) - 1).clamp(min=0), use_cache=False,
            ).last_hidden_state  # (B, F, D)
        self.context.copy_(torch.where(prompt.whole[:, None] > 0, hidden[:, -1], start))

    def token_block(self):
        """The token decoder's L steps from `context`: tokens into `block`, generated ones into `tokens`."""
        model, rules = self.model, self.rules
        r = self.prefix_length
        embeds = model.prefix_inputs(self.context)  # (B, r, D)
        for i in range(self.block_length):
            write = slice(0, r) if i == 0 else slice(r + i - 1, r + i)
            plan = _Plan(self.token_kv, write, visible=write.stop, first_query=write.start)
            with planned(model.token_decoder, plan):
                logits = model.token_decoder(
                    inputs_embeds=embeds, position_ids=self.token_positions[i], use_cache=False, logits_to_keep=1,
                ).logits[:, -1]  # (B, V)
            chosen = choose_tokens(logits, rules.warpers, rules.eos, rules.min_new, self.produced, self.finished,
                                   rules.pad_id, sample=rules.sample)
            is_given = i < self.n_forced  # (B,)
            token = torch.where(is_given, self.forced[:, i], chosen)  # (B,)
            rules.record(self.tokens, token, is_given, self.produced, self.finished)
            self.block[:, i] = token
            if i + 1 < self.block_length:
                embeds = model.token_decoder.get_input_embeddings()(token[:, None])  # (B, 1, D)
        self.n_forced.zero_()  # only the first block has given tokens
        self.done.copy_((self.finished | (self.produced >= rules.max_new)).all())

    def block_step(self, visible: int):
        """Embed `block`, one block-decoder step at `write_slot` over the first `visible` slots -> `context`."""
        model = self.model
        self.key_valid.index_fill_(1, self.write_slot, True)
        plan = _Plan(self.block_kv, self.write_slot, visible, key_valid=self.key_valid[:, :visible])
        with planned(model.block_decoder, plan):
            hidden = model.block_decoder(
                inputs_embeds=model.embed_blocks(self.block), position_ids=self.block_position, use_cache=False,
            ).last_hidden_state  # (B, 1, D)
        self.context.copy_(hidden[:, -1])
        self.block_position += 1
        self.write_slot += 1


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
    """Where the eager engine's generated tokens go (B, max_new), and the rules that pick them."""

    tokens: torch.Tensor
    rules: TokenRules
    streamer: object

    def choose(self, logits, rows: _ActiveRows, given, is_given):
        """Pick the next token of every active row (A,), record the generated ones, update `rows`."""
        rules = self.rules
        chosen = choose_tokens(logits, rules.warpers, rules.eos, rules.min_new, rows.produced, rows.finished,
                               rules.pad_id, rows=(self.tokens.shape[0], rows.index), sample=rules.sample)
        token = torch.where(is_given, given, chosen)  # (A,)
        writes = ~is_given & (rows.produced < self.tokens.shape[1])  # (A,)
        column = rows.produced.clamp(max=self.tokens.shape[1] - 1)
        current = self.tokens[rows.index, column]
        self.tokens[rows.index, column] = torch.where(writes, token, current)
        if self.streamer is not None and bool(writes[0]):
            self.streamer.put(token.cpu())
        if len(rules.eos):
            rows.finished |= writes & torch.isin(token, rules.eos)
        rows.produced += writes.long()
        return token
