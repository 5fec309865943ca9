"""Zero-shot task accuracy: log-likelihood of each continuation given its context, scored as
lm-evaluation-harness's Hugging Face wrapper (`HFLM`) scores `loglikelihood` requests.

Tokenisation, as HFLM's: trailing whitespace of the context moves to the front of the continuation; the
context and context + continuation are encoded with the tokenizer's defaults; the continuation's tokens
are the whole encoding's tokens past the context's. The input is the last `max_length + 1` tokens less
the final one; `logits[:, t]` scores token t+1 (contract 2), so the continuation's scores are the last
len(continuation) rows.

Batches are right-padded and no attention mask is given: by causality (contract 3) the padding after a
row's last token changes none of its scores. Every row starts at its own first token, so a Block
Transformer anchors its blocks there, exactly as `forward` does for the row alone.

Metrics, as lm-eval's: for a multiple-choice item the prediction is the choice of highest log-likelihood
(`acc`), or of highest log-likelihood per character of the choice without its leading space
(`acc_norm`); for LAMBADA, `acc` is whether the target word is the greedy continuation, token for token,
and `perplexity` is exp(-mean log-likelihood of the target word). Standard errors are the sample
standard deviation of the per-item scores over sqrt(items).
"""

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .tasks import TASKS, Request

DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when neither config nor tokenizer names a context length
TOKENIZER_INFINITY = int(1e30)  # what transformers sets model_max_length to when the tokenizer has none


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as HFLM makes them."""
    if not context.strip():  # HFLM conditions an empty context on the BOS token (EOS when there is none)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(context + continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def max_length(model, tokenizer) -> int:
    """The longest input HFLM would give `model`: its config's context length, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit is not None and tokenizer_limit < TOKENIZER_INFINITY:
        return int(tokenizer_limit)
    return DEFAULT_MAX_LENGTH


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                   label: str = "model", progress: bool = True) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether the continuation is the greedy one) for each pair, in order."""
    device = next(model.parameters()).device
    limit = max_length(model, tokenizer)
    encoded = []
    for context, continuation in pairs:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise UserError(f"the continuation {continuation!r} of {context[-40:]!r} has no tokens")
        tokens = (context_ids + continuation_ids)[-(limit + 1):][:-1]  # the model's input
        encoded.append((tokens, continuation_ids))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # longest first, as HFLM
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=f"scoring {label}", unit="batch", disable=not progress):
        width = len(encoded[batch[0]][0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # right-padded (B, T)
        for row, index in enumerate(batch):
            tokens = encoded[index][0]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        logits = model(ids.to(device)).logits  # (B, T, V)
        for row, index in enumerate(batch):
            tokens, continuation = encoded[index]
            end = len(tokens)
            scores = logits[row, end - len(continuation) : end].float().log_softmax(-1)  # (C, V)
            target = torch.tensor(continuation, device=scores.device)
            total = scores.gather(1, target[:, None]).sum().item()
            results[index] = (total, bool(torch.equal(scores.argmax(-1), target)))
    return results


def stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (n - 1) over sqrt(n); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1) / n)


def task_metrics(name: str, requests: Sequence[Request], scores: Sequence[tuple[float, bool]]) -> dict:
    """A task's metrics from its requests and their (log-likelihood, greedy) scores."""
    task = TASKS[name]
    items: dict[int, list[tuple[Request, float, bool]]] = {}
    for request, (loglikelihood, greedy) in zip(requests, scores, strict=True):
        items.setdefault(request.item, []).append((request, loglikelihood, greedy))
    result = {"items": len(items), "requests": len(requests)}
    if task.kind == "last_word":
        targets = [choices[0] for choices in items.values()]
        correct = [float(greedy) for _, _, greedy in targets]
        mean_loglikelihood = sum(value for _, value, _ in targets) / len(targets)
        result.update(acc=_mean(correct), acc_stderr=stderr(correct),
                      perplexity=math.exp(min(-mean_loglikelihood, 700.0)))
        return result
    correct, correct_norm = [], []
    for choices in items.values():
        gold = choices[0][0].gold
        correct.append(float(_best(choices, lambda r, value: value) == gold))
        correct_norm.append(float(_best(choices, lambda r, value: value / _characters(r.continuation)) == gold))
    result.update(acc=_mean(correct), acc_stderr=stderr(correct))
    if task.length_normalised:
        result.update(acc_norm=_mean(correct_norm), acc_norm_stderr=stderr(correct_norm))
    return result


def _best(choices, key) -> int:
    """The choice index with the highest key; the first of equals, as numpy's argmax."""
    best = max(range(len(choices)), key=lambda i: key(choices[i][0], choices[i][1]))
    return choices[best][0].choice


def _characters(continuation: str) -> int:
    """Characters lm-eval divides by: the choice's, without the space that joins it to the context."""
    return max(len(continuation.removeprefix(" ")), 1)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def evaluate_tasks(model, tokenizer, requests: dict[str, list[Request]], batch_size: int = 16,
                   label: str = "model") -> dict[str, dict]:
    """{task: metrics} for the given {task: requests}, all scored in one pass (longest first)."""
    names = list(requests)
    flat = [(name, request) for name in names for request in requests[name]]
    scores = loglikelihoods(model, tokenizer, [(r.context, r.continuation) for _, r in flat], batch_size, label)
    results, start = {}, 0
    for name in names:
        count = len(requests[name])
        results[name] = task_metrics(name, requests[name], scores[start : start + count])
        start += count
    return results


def format_task_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per task and model; results is {model name: {task: metrics}}."""
    rows = ["| task | model | items | acc | acc_norm | perplexity |", "|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(task for tasks in results.values() for task in tasks))
    for task in names:
        for model, tasks in results.items():
            if task not in tasks:
                continue
            r = tasks[task]
            norm = _percent(r, "acc_norm") if "acc_norm" in r else "-"
            perplexity = f"{r['perplexity']:,.2f}" if "perplexity" in r else "-"
            rows.append(f"| {task} | {model} | {r['items']:,} | {_percent(r, 'acc')} | {norm} | {perplexity} |")
    return "\n".join(rows)


def _percent(result: dict, key: str) -> str:
    error = result.get(f"{key}_stderr")
    return f"{100 * result[key]:.2f}" + (f" ± {100 * error:.2f}" if error is not None else "")


def task_records(results: dict[str, dict[str, dict]], settings: dict) -> dict[str, dict]:
    """{task: {"model": metrics, "baseline": metrics, "settings": ...}} from {"model"/"baseline": {task: metrics}}.

    Each task carries its own settings, so that results of separate runs (other tasks, another --limit) can
    sit side by side in one eval_results.json."""
    tasks = list(dict.fromkeys(task for per_model in results.values() for task in per_model))
    records = {}
    for task in tasks:
        records[task] = {key: per_model[task] for key, per_model in results.items() if task in per_model}
        records[task]["settings"] = {**settings, "split": TASKS[task].split, "dataset": TASKS[task].dataset}
    return records

