"""Continuous batching: unrelated requests share one running batch of a static engine.

One worker thread owns the model and its engine (`BlockEngine` for a block model, `VanillaEngine` for a plain
causal LM): B rows, each with a cache for a whole context, and per-row token limits and sampling settings
(`TokenRules.for_rows`). The loop, once a round (a block for the block model, a token for the vanilla one):

    admit   waiting jobs, in arrival order, into free rows: each prompt prefilled alone into its row
    advance one round of the engine, over the cache slots that the live rows reach
    collect each live row's new tokens, decoded into text, cut at a stop string
    free    rows whose job ended (EOS, its token limit, a stop string, a client gone) for the next admit

So a new request waits at most one round before it joins, and a row's tokens are what its prompt gives alone
(greedy; sampled with its own seed). Other threads only `submit` and `cancel` jobs and receive events through
each job's `deliver` callback: `Delta` (new text), then `Finished` or `Failed`. A full batch queues jobs up
to `max_queue` beyond the free rows; past that `submit` raises `QueueFull`.
"""

import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .architectures import is_block_model
from .generation_block_transformer import (
    BlockEngine,
    BlockPrompt,
    EngineShape,
    RowSampling,
    TokenRules,
    buckets,
)
from .vanilla_engine import VanillaEngine, VanillaPrompt

# Config keys that give a model's context length in tokens, by family.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_limit(model) -> int | None:
    """The context length (tokens) the model was built for; a block model's is its source's, which its block
    decoder's config keeps."""
    config = model.config.block_decoder if is_block_model(model) else model.config
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: the model's generation config's, and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


# -- what a job tells its caller ------------------------------------------------------------------------------


@dataclass
class Delta:
    text: str  # new text (may be empty while a stop string or a character is incomplete)
    token_ids: list[int]  # the new tokens


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One prompt to complete. `deliver` is called from the worker thread with each event."""

    prompt: list[int]
    max_tokens: int
    deliver: Callable[[object], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_tokens whatever comes (load tests)
    cancelled: bool = False  # set by `Scheduler.cancel`; the worker frees the row at the next round
    tokens: list[int] = field(default_factory=list)  # generated so far (the worker's)
    stream: "TextStream | None" = None  # their text (the worker's)

    @property
    def mode(self) -> str:
        return RowSampling.mode_for(self.temperature, self.top_k, self.top_p)


class TextStream:
    """The text of a growing token sequence, piece by piece, cut before the first stop string.

    Each new piece is decoded with the tokens just before it as context and kept back while it ends in an
    incomplete character (the incremental detokenization of text-generation-inference), so that pieces join
    into the text of the whole sequence; the last `longest stop - 1` characters are kept back until they
    cannot start a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the context of the next piece
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` handed out

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Take one token -> (text to hand out now, whether a stop string ended the text)."""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        start = max(self.sent - self.hold, 0)
        found = [at for at in (self.text.find(stop, start) for stop in self.stops) if at >= 0]
        if found:
            self.text = self.text[: min(found)]
            return self.take(len(self.text)), True
        return self.take(len(self.text) - self.hold), False

    def take(self, end: int) -> str:
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece

    def flush(self) -> str:
        """The rest of the text, at the end of the sequence (an incomplete character as it decodes)."""
        before = self.decode(self.ids[self.prefix : self.read])
        self.text += self.decode(self.ids[self.prefix :])[len(before) :]
        return self.take(len(self.text))


class QueueFull(Exception):
    """Every row is busy and the queue is full."""


class Closed(Exception):
    """The scheduler is shutting down."""


class Scheduler:
    """The worker thread and its running batch (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int, context: int, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.context, self.max_queue = max_batch, context, max_queue
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        self.block_length = model.config.block_length if is_block_model(model) else None
        self.condition = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running = 0  # rows holding a job
        self.closing = False
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.thread = threading.Thread(target=self.work, name="uptrain-engine", daemon=True)

    # -- what other threads call ----------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Start the worker; returns once its engine is built and warmed up (raises what building raised)."""
        self.thread.start()
        self.ready.wait()
        if self.startup_error is not None:
            raise self.startup_error
        return self

    def submit(self, job: Job) -> None:
        """Queue a job (arrival order); raises QueueFull or Closed."""
        with self.condition:
            if self.closing:
                raise Closed("the server is shutting down")
            if len(self.waiting) >= self.max_queue + max(self.max_batch - self.running, 0):
                raise QueueFull(
                    f"the server is at capacity: {self.running} requests running, {len(self.waiting)} waiting "
                    f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later"
                )
            self.waiting.append(job)
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client is gone): its row is freed at the next round; no more events."""
        job.cancelled = True
        with self.condition:
            self.condition.notify()

    def load(self) -> dict:
        with self.condition:
            return {"running": self.running, "waiting": len(self.waiting)}

    def close(self) -> None:
        """Finish the jobs already submitted, then stop the worker."""
        with self.condition:
            self.closing = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join()

    # -- the worker ---------------------------------------------------------------------------------------

    def open_engine(self):
        """The engine: B rows, cache slots for `context` tokens a row, every visible-length bucket."""
        if self.block_length:
            engine_class, slots = BlockEngine, -(-self.context // self.block_length)
        else:
            engine_class, slots = VanillaEngine, self.context
        shape = EngineShape(self.max_batch, slots, tuple(sorted(set(buckets(0, slots, slots)))))
        rules = TokenRules.for_rows(self.max_batch, self.context, self.eos, self.pad_id, self.device)
        return engine_class.open(self.model, shape, rules)

    def prompt_of(self, ids: list[int], max_tokens: int):
        """One prompt as the engine takes it."""
        tensor = torch.tensor([ids], device=self.device)
        mask = torch.ones_like(tensor)
        if self.block_length:
            return BlockPrompt.lay_out(tensor, mask, self.block_length, max_tokens)
        return VanillaPrompt(tensor, mask, max_tokens)

    @torch.no_grad()  # the engine's buffers carry over from round to round: no autograd graph may link them
    def work(self):
        try:
            self.engine = self.open_engine()  # in this thread: CUDA graphs are captured where they replay
            self.warm_up()
        except BaseException as error:  # noqa: BLE001 - handed to the thread that called start()
            self.startup_error = error
            self.ready.set()
            return
        self.ready.set()
        self.jobs: dict[int, Job] = {}  # row -> its job
        self.free = list(range(self.max_batch))
        while True:
            with self.condition:
                self.waiting = deque(job for job in self.waiting if not job.cancelled)
                while not (self.jobs or self.waiting or self.closing):
                    self.condition.wait()
                if self.closing and not (self.jobs or self.waiting):
                    break
                admitted = []
                while self.waiting and self.free:
                    admitted.append((self.free.pop(0), self.waiting.popleft()))
                self.running = len(self.jobs) + len(admitted)
            try:
                self.round(admitted)
            except Exception:  # noqa: BLE001 - one failed round must not stop the server
                message = traceback.format_exc()
                print(message, file=sys.stderr, flush=True)
                for row, job in {**dict(admitted), **self.jobs}.items():
                    job.deliver(Failed("generation failed: " + message.strip().splitlines()[-1]))
                    self.release(row)
                self.engine.stop(self.engine.rows)

    def warm_up(self):
        """One short job through a row, so that an architecture the engine cannot run fails at startup."""
        self.engine.rules.per_row.set_row(0, max_new=2)
        self.engine.prefill(self.prompt_of([self.pad_id] * 3, 2), rows=torch.tensor([0], device=self.device))
        self.engine.advance(buckets(0, 1, self.engine.shape.slots)[0])
        self.engine.stop(self.engine.rows)

    def round(self, admitted: list[tuple[int, Job]]):
        """Admit the new jobs, drop the cancelled ones, advance the live rows one round, hand out their tokens."""
        engine = self.engine
        for row, job in list(self.jobs.items()):
            if job.cancelled:
                engine.stop([row])
                self.release(row)
        self.set_mode([job for _, job in admitted])
        for row, job in admitted:
            self.jobs[row] = job
            if job.cancelled:
                self.release(row)
                continue
            settings = (job.max_tokens, job.temperature, job.top_k, job.top_p, job.seed, job.ignore_eos)
            engine.rules.per_row.set_row(row, *settings)
            engine.prefill(self.prompt_of(job.prompt, job.max_tokens), rows=torch.tensor([row], device=self.device))
            job.stream = TextStream(self.tokenizer, job.stop)
        self.collect()
        if not self.jobs:
            return
        live = engine.live.nonzero()[:, 0]
        if len(live):
            reach = int(engine.write_slot[live].max())
            engine.advance(buckets(reach, 1, engine.shape.slots)[0])
            self.collect()

    def set_mode(self, admitted: list[Job]):
        """Uncaptured steps compute only what the live rows' settings need; captured ones compute it all."""
        if self.engine.graphs.enabled:
            return
        modes = {job.mode for job in [*self.jobs.values(), *admitted]}
        self.engine.rules.per_row.mode = max(modes, key=RowSampling.MODES.index, default="greedy")

    def collect(self):
        """Hand out each job's new tokens as text; end the jobs that are done and free their rows."""
        engine = self.engine
        rows = sorted(self.jobs)
        if not rows:
            return
        index = torch.tensor(rows, device=self.device)
        produced, live = (t.tolist() for t in torch.stack([engine.produced[index], engine.live[index].long()]).cpu())
        seen = torch.tensor([len(self.jobs[row].tokens) for row in rows], device=self.device)
        width = max(max(p - len(self.jobs[row].tokens) for row, p in zip(rows, produced)), 0)
        columns = (seen[:, None] + torch.arange(width, device=self.device)).clamp(max=engine.tokens.shape[1] - 1)
        new = engine.tokens[index[:, None], columns].tolist()  # (R, width)
        for row, count, still, window in zip(rows, produced, live, new):
            job = self.jobs[row]
            taken, pieces, reason, stopped = [], [], None, False
            for token in window[: count - len(job.tokens)]:
                taken.append(token)
                job.tokens.append(token)
                piece, stopped = job.stream.add(token)
                pieces.append(piece)
                if stopped or (token in self.eos and not job.ignore_eos):
                    reason = "stop"
                elif len(job.tokens) >= job.max_tokens:
                    reason = "length"
                if reason is not None:
                    break  # a block may hold tokens past the end: padding, or text after a stop string
            if reason is None and not still:
                reason = "length"
            if reason is not None and not stopped:
                pieces.append(job.stream.flush())
            text = "".join(pieces)
            if text or taken:
                job.deliver(Delta(text, taken))
            if reason is not None:
                job.deliver(Finished(reason, len(job.prompt), len(job.tokens)))
                if still:
                    engine.stop([row])
                self.release(row)

    def release(self, row: int):
        self.jobs.pop(row, None)
        if row not in self.free:
            self.free.append(row)
        with self.condition:
            self.running = len(self.jobs)
