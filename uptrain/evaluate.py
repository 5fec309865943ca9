"""Loss, perplexity and bits per byte of a model (and a baseline) over exactly the same token windows.

The text is tokenized once, with the model's tokenizer; documents are joined with EOS as in training
data. The token stream is cut into non-overlapping windows of `seq_len` tokens, each scored on its own:
the first token of a window has no context and is not scored; every other token is scored from the
window's earlier tokens. For a Block Transformer the first block of each window therefore gets its
context from the learned start vector, exactly as the first block of any sequence does.
Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the scored tokens' text.
"""

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError


def text_windows(tokenizer, documents: list[str], seq_len: int, max_windows: int | None) -> list[torch.Tensor]:
    """Non-overlapping windows (seq_len,) of the EOS-joined token stream of `documents`."""
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    stream = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    windows = [torch.tensor(stream[i : i + seq_len]) for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not windows:
        raise UserError(f"the evaluation text has {len(stream)} tokens, fewer than one window of {seq_len}")
    return windows[:max_windows] if max_windows else windows


def read_documents(paths: list[str]) -> list[str]:
    """Documents of each path (files, folders or globs), read as `uptrain data prepare` reads a corpus."""
    from .data import read_documents as corpus_documents

    documents = []
    for spec in paths:
        if not any(char in spec for char in "*?[") and not Path(spec).exists():
            raise UserError(f"evaluation data not found: {spec}")
        documents += list(corpus_documents(spec))
    return documents


def batches(windows: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(windows), size):
        yield torch.stack(windows[start : start + size])  # (b, seq_len)


@torch.no_grad()
def score(model, tokenizer, windows: list[torch.Tensor], batch_size: int = 8, label: str = "model") -> dict:
    """Summed next-token loss over the windows; loss (nats/token), perplexity and bits per byte."""
    device = next(model.parameters()).device
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for batch in tqdm(list(batches(windows, batch_size)), desc=f"scoring {label}", unit="batch"):
        ids = batch.to(device)
        logits = model(ids).logits.float()  # (b, seq_len, V)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nats += losses.item()
        total_tokens += ids[:, 1:].numel()
        total_bytes += sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in batch)
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": total_nats / math.log(2) / total_bytes,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "windows": len(windows),
    }


def format_table(results: dict[str, dict]) -> str:
    rows = ["| model | loss | perplexity | bits/byte | tokens |", "|---|---|---|---|---|"]
    for name, r in results.items():
        figures = f"{r['loss']:.4f} | {r['perplexity']:,.2f} | {r['bits_per_byte']:.4f} | {r['tokens']:,}"
        rows.append(f"| {name} | {figures} |")
    return "\n".join(rows)
