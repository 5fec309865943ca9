"""What serving relies on below the HTTP layer: each row of a static engine with its own token limit and
sampling settings (`RowSampling`), whose draws depend on its seed and token index alone; the scheduler's
queue, cancellation and text stream; the command's mistakes. References: transformers' warpers, `generate()`
alone, a run of the same settings in an engine of another size, the tokenizer's decode of the whole sequence."""

import queue
import socket
import time

import pytest
import torch
from conftest import load_block_model
from families import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from uptrain.generation_block_transformer import (
    BlockEngine,
    BlockPrompt,
    EngineShape,
    RowSampling,
    TokenRules,
    uniform_draws,
)
from uptrain.scheduler import Delta, Finished, Job, QueueFull, Scheduler, TextStream
from uptrain.vanilla_engine import VanillaEngine, VanillaPrompt

SETTINGS = [(0.7, 0, 1.0), (1.2, 20, 1.0), (1.0, 0, 0.8), (0.9, 10, 0.9)]  # (temperature, top_k, top_p)


def warped(logits, temperature, top_k, top_p):
    """transformers' warpers, in generate()'s order, then the softmax (float64)."""
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].double())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores[0], -1)


def test_each_row_samples_from_its_own_warped_distribution():
    """3,000 draws a row (token indices 0..2999, one seed), four rows with different settings in one call:
    tokens outside transformers' warped support never come, and the frequencies pass a chi-square test."""
    logits = torch.randn(128, generator=torch.Generator().manual_seed(0)) * 2
    sampling = RowSampling.empty(len(SETTINGS), "cpu")
    for row, (temperature, top_k, top_p) in enumerate(SETTINGS):
        sampling.set_row(row, 1, temperature, top_k, top_p, seed=row + 10)
    draws = 3000
    rows = torch.arange(len(SETTINGS)).repeat_interleave(draws)
    tokens = sampling.choose(logits.expand(len(rows), -1).clone(), torch.arange(draws).repeat(len(SETTINGS)), rows)
    for row, settings in enumerate(SETTINGS):
        probs = warped(logits, *settings)
        counts = torch.bincount(tokens[rows == row], minlength=128).double()
        assert (counts[probs == 0] == 0).all(), settings
        expected = draws * probs
        big = expected >= 5
        observed = torch.cat([counts[big], counts[~big].sum()[None]])
        wanted = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = wanted > 0
        bins = int(keep.sum())
        chi2 = float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum())
        assert chi2 < bins + 5 * (2 * bins) ** 0.5, (settings, chi2, bins)


def test_a_rows_draw_depends_on_its_seed_and_token_index_alone():
    logits = torch.randn(4, 128, generator=torch.Generator().manual_seed(1)) * 2

    def tokens(sampling, place, mode, steps=40):
        sampling.mode = mode
        out = []
        for step in range(steps):
            chosen = sampling.choose(logits.clone(), torch.full((4,), step))
            out.append(int(chosen[place]))
        return out

    alone = RowSampling.empty(4, "cpu")
    alone.set_row(0, 1, temperature=0.8, seed=77)
    crowded = RowSampling.empty(4, "cpu")  # the same row at another place, beside greedy and filtered rows
    crowded.set_row(2, 1, temperature=0.8, seed=77)
    crowded.set_row(1, 1, temperature=1.0, top_k=3, seed=5)
    crowded.set_row(3, 1, temperature=0.0)
    logits[2] = logits[0]
    reference = tokens(alone, 0, "sample")
    assert tokens(crowded, 2, "filter") == reference
    assert tokens(alone, 0, "filter") == reference
    assert len(set(reference)) > 5  # it samples
    other = RowSampling.empty(4, "cpu")
    other.set_row(0, 1, temperature=0.8, seed=78)
    assert tokens(other, 0, "sample") != reference
    assert tokens(crowded, 3, "filter") == [int(logits[3].argmax())] * 40  # temperature 0: greedy
    draws = uniform_draws(torch.tensor([[5, 0], [0, 5], [5, 0]]), torch.tensor([0, 0, 1]))
    assert len(set(draws.tolist())) == 3 and ((0 <= draws) & (draws < 1)).all()


def run_rows(engine_class, model, prompts, joins, settings, batch, slots, eos=()):
    """Start prompt i in row rows[i] after joins[i] rounds, each with its settings; run until every row is done
    -> each prompt's tokens (as many as the row produced)."""
    rules = TokenRules.for_rows(batch, 64, list(eos), 0, "cpu")
    visible = tuple(range(32, slots, 32)) + (slots,)
    with engine_class.open(model, EngineShape(batch, slots, visible), rules) as engine:
        started, rounds = [], 0
        while len(started) < len(prompts) or not bool(engine.done):
            for i, (row, after) in enumerate(joins):
                if after == rounds and i not in started:
                    ids = torch.tensor([prompts[i]])
                    limit = settings[i][0]
                    engine.rules.per_row.set_row(row, *settings[i])
                    if engine_class is BlockEngine:
                        prompt = BlockPrompt.lay_out(ids, torch.ones_like(ids), model.config.block_length, limit)
                    else:
                        prompt = VanillaPrompt(ids, torch.ones_like(ids), limit)
                    engine.prefill(prompt, rows=torch.tensor([row]))
                    started.append(i)
            engine.rules.per_row.mode = "filter"
            engine.advance(slots)
            rounds += 1
        return [engine.tokens[row, : int(engine.produced[row])].tolist() for row, _ in joins]


@pytest.mark.parametrize("kind", ["block", "vanilla"])
def test_rows_with_their_own_settings_join_a_running_engine(kind, converted, tiny_source):
    """A greedy row gets what generate() gives its prompt alone and a sampled one what its settings give in an
    engine of another size, alone; each row stops at its own limit, EOS ends a row unless it ignores EOS."""
    if kind == "block":
        model, engine_class = load_block_model(converted("llama")), BlockEngine
    else:
        model, engine_class = tiny_source("qwen2")[1], VanillaEngine
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 128, (n,), generator=gen).tolist() for n in (6, 11, 3)]
    greedy, sampled, ending = (13, 0.0), (17, 0.9, 30, 0.95, 7, True), (20, 0.0)
    with torch.no_grad():
        alone = model.generate(torch.tensor([prompts[0]]), max_new_tokens=13, do_sample=False, eos_token_id=None)
    eos = int(alone[0, 6 + 4])  # a token of the greedy row: it ends there unless EOS is ignored

    def cut(tokens):
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    got = run_rows(engine_class, model, prompts, [(2, 0), (0, 2), (1, 3)], [greedy, sampled, ending], 3, 64, [eos])
    by_itself = run_rows(engine_class, model, prompts[1:2], [(0, 0)], [sampled], 1, 64, [eos])
    assert cut(got[0]) == cut(alone[0, 6:].tolist()) and len(cut(got[0])) <= 5
    assert set(got[0][len(cut(got[0])) :]) <= {0}  # padding after EOS
    assert got[1] == by_itself[0] and len(got[1]) == 17
    with torch.no_grad():
        third = model.generate(torch.tensor([prompts[2]]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert cut(got[2]) == cut(third[0, 3:].tolist())


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer: multi-byte characters span tokens, words carry their spaces."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "Grüße aus Köln", "数据 and 世界", "stop here STOP now"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_text_stream_pieces_join_into_the_whole_text_and_stop_at_a_stop_string():
    tokenizer = byte_level_tokenizer()
    text = "the cat sat: Grüße, 世界 🎉! then STOP here and more"
    ids = tokenizer(text).input_ids
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # some characters span tokens
    stream, pieces = TextStream(tokenizer, []), []
    for token in ids:
        piece, stopped = stream.add(token)
        assert not stopped and "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(stream.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    for stops, expected in (
        (["STOP"], "the cat sat: Grüße, 世界 🎉! then "),
        (["世界", "cat"], "the "),
        (["zz"], text),
    ):
        stream, pieces, stopped = TextStream(tokenizer, stops), [], False
        for token in ids:
            piece, stopped = stream.add(token)
            pieces.append(piece)
            if stopped:
                break
        if not stopped:
            pieces.append(stream.flush())
        assert "".join(pieces) == expected and stopped == (expected != text)


def test_scheduler_queue_cancel_and_limits(converted):
    model = load_block_model(converted("llama"))
    scheduler = Scheduler(model, tiny_tokenizer(), max_batch=2, context=96, max_queue=1).start()
    try:
        delivered = queue.Queue()  # (job, event), in the order the worker hands them out
        jobs = [Job([5, 6, 7], 80, lambda e, i=i: delivered.put((i, e)), ignore_eos=True) for i in range(2)]
        jobs.append(Job([9, 10], 6, lambda e: delivered.put((2, e)), ignore_eos=True))
        for job in jobs:
            scheduler.submit(job)
        with pytest.raises(QueueFull, match="at capacity"):
            scheduler.submit(Job([1], 2, print))
        deadline = time.monotonic() + 30
        while scheduler.load() != {"running": 2, "waiting": 1}:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        scheduler.cancel(jobs[0])  # its row goes to the waiting job at once
        tokens, ends = {0: [], 1: [], 2: []}, []
        while len(ends) < 2:
            index, event = delivered.get(timeout=60)
            if isinstance(event, Delta):
                tokens[index] += event.token_ids
            else:
                ends.append((index, event))
        assert ends == [(2, Finished("length", 2, 6)), (1, Finished("length", 3, 80))]  # the short job first
        assert len(tokens[2]) == 6 and len(tokens[1]) == 80 and len(tokens[0]) < 80
        assert scheduler.load() == {"running": 0, "waiting": 0}
        assert scheduler.engine.context.grad_fn is None  # no autograd graph grows from round to round
    finally:
        scheduler.close()
    assert not scheduler.thread.is_alive()


def test_serve_command_mistakes_are_one_line(converted, run_cli):
    """A port in use or a bad option: one line on stderr and exit 1, before the model is loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", converted("llama"), "--port", port)
    assert result.exit_code == 1 and result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    result = run_cli("serve", converted("llama"), "--max-batch", 0)
    assert result.exit_code == 1 and "--max-batch must be at least 1" in result.stderr
