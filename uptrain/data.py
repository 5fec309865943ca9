"""Token data for uptraining: `prepare` tokenizes a text corpus once into raw token shards with a manifest;
`TokenData` reads them back through memory maps, so training needs neither the tokenizer nor `datasets`,
and every sample is a pure function of (seed, global sample index): resuming or changing the number of
processes replays exactly the same data.

Folder layout (format `block-uptrain-tokens/1`): `manifest.json` plus `train-00000.bin`, ...,
`val-00000.bin`, ...: each shard a little-endian uint16 (vocab <= 65536) or uint32 array, the split's
shards concatenated forming one stream in which every document ends with the EOS token."""

import glob
import hashlib
import itertools
import json
import os
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError, first_line
from .export import staged_folder

FORMAT = "block-uptrain-tokens/1"
SPLITS = ("train", "val")
KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}  # suffix -> reader
FILE_TYPES = ".txt, .jsonl, .json or .parquet"
GLOB_CHARS = "*?["
TOKENIZE_BATCH = 1000  # documents per tokenizer call: fast (batched) yet memory-bounded


# ----------------------------------------------------------------------------------------------------------
# Writing: prepare


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and the EOS/BOS ids: what token ids mean, so it is the same for one tokenizer
    loaded from anywhere (a source folder, or a converted folder that copied it) and differs when ids differ."""
    identity = {
        "vocab": tokenizer.get_vocab(), "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare(
    source: str | Path,
    out: str | Path,
    tokenizer,
    *,
    tokenizer_name: str = "",
    split: str = "train",
    text_field: str = "text",
    name: str | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = 50_000_000,
    overwrite: bool = False,
) -> dict:
    """Tokenize `source` into token shards in `out`; return the manifest (also written as manifest.json).

    `source` is a .txt/.jsonl/.json/.parquet file, a folder of them (searched recursively), a glob pattern,
    or a hub dataset id (`name` and `split` select its config and split). A .txt file holds documents
    separated by blank lines; other files hold one document per row, in `text_field`. Documents are
    tokenized without special tokens (a literal "</s>" in the text stays text) and each gets one EOS.
    Document i goes to "val" when random.Random(f"{seed}-{i}").random() < val_fraction; if that leaves a
    side empty and there are >= 2 documents (and val_fraction > 0), the last document goes to that side.
    """
    source, out = str(source), Path(out)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {tokenizer_name or '(unnamed)'} has no EOS token, which is needed to end documents")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val fraction must be at least 0 and below 1, got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard size must be at least 1 token, got {shard_tokens}")
    files = _source_files(source, out)
    vocab_size = len(tokenizer)
    dtype = np.dtype("<u2" if vocab_size <= 2**16 else "<u4")

    with staged_folder(out, overwrite) as staging:
        writers = {s: _ShardWriter(staging, s, dtype, shard_tokens) for s in SPLITS}
        try:
            count = _tokenize_into(writers, _documents(source, files, text_field, name, split), tokenizer, eos,
                                   val_fraction, seed)
        finally:
            for writer in writers.values():
                writer.close()
        if count == 0:
            raise UserError(f"no text found in {source}: the corpus is empty")
        manifest = {
            "format": FORMAT,
            "tokenizer": {
                "name": tokenizer_name,
                "sha256": tokenizer_fingerprint(tokenizer),
                "vocab_size": vocab_size,
                "eos_token_id": eos,
                "bos_token_id": tokenizer.bos_token_id,
            },
            "dtype": {2: "uint16", 4: "uint32"}[dtype.itemsize],
            "splits": {s: writer.record() for s, writer in writers.items()},
            "source": source,
            "text_field": text_field,
            "val_fraction": val_fraction,
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _tokenize_into(writers: dict, documents: Iterable[str], tokenizer, eos: int, val_fraction: float, seed: int) -> int:
    """Tokenize documents in batches and write each to its split; return the number of documents."""

    def split_of(index: int) -> str:
        return "val" if val_fraction > 0 and random.Random(f"{seed}-{index}").random() < val_fraction else "train"

    dtype = writers["train"].dtype
    count = tokens = 0
    pending = None  # (index, tokens) of the newest document: written when the next arrives, so the last can move
    with tqdm(desc="tokenizing", unit="doc") as progress:
        for texts in _batched(documents, TOKENIZE_BATCH):
            ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            for document in ids:
                if pending is not None:
                    writers[split_of(pending[0])].write(pending[1])
                pending = (count, np.array(document + [eos], dtype=dtype))  # (n_i + 1,)
                count += 1
                tokens += len(document) + 1
            progress.update(len(texts))
            progress.set_postfix(tokens=tokens)
    if pending is not None:
        side = split_of(pending[0])
        if count >= 2 and val_fraction > 0:
            side = next((s for s in SPLITS if writers[s].documents == 0), side)
        writers[side].write(pending[1])
    return count


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _ShardWriter:
    """Appends documents to `{split}-NNNNN.bin`, starting a new file every `shard_tokens` tokens (documents
    run across shard boundaries: the shards form one stream). Files are created only when written to."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} in stream order
        self.documents = 0
        self.handle = None

    def write(self, tokens: np.ndarray) -> None:
        self.documents += 1
        while len(tokens):
            if self.handle is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.handle = open(self.folder / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            piece = tokens[: self.shard_tokens - self.shards[-1]["tokens"]]
            self.handle.write(piece.tobytes())
            self.shards[-1]["tokens"] += len(piece)
            tokens = tokens[len(piece):]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def record(self) -> dict:
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents}


def read_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """The non-blank documents of a corpus (files, folder, glob or hub id), read exactly as `prepare` reads them."""
    return _documents(source, _source_files(source), text_field, None, "train")


def _source_files(source: str, out: Path | None = None) -> list[Path] | None:
    """The local files `source` names, in a fixed order; None when it is a hub dataset id. Files inside
    `out` (an earlier output written into the corpus folder) are skipped."""
    if any(char in source for char in GLOB_CHARS):
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in KINDS]
        if not files:
            raise UserError(f"no {FILE_TYPES} files match {source}")
        return files
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in KINDS:
            raise UserError(f"source {source} is not a {FILE_TYPES} file")
        return [path]
    if path.is_dir():
        out = out.resolve() if out is not None else None
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in KINDS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)  # hidden, or a staging folder
            and (out is None or out not in p.resolve().parents)  # an earlier output inside the corpus folder
        )
        if not files:
            raise UserError(f"folder {source} has no {FILE_TYPES} files")
        return files
    looks_local = (
        source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or path.suffix.lower() in KINDS
    )
    if looks_local:
        raise UserError(f"source not found: {source}")
    return None


def _documents(source: str, files: list[Path] | None, text_field: str, name: str | None, split: str) -> Iterator[str]:
    """The corpus's non-blank documents, in order: paragraphs of .txt files, `text_field` of rows elsewhere."""
    if files is None:
        texts = _dataset_texts(f"dataset {source}", text_field, source, name, split=split)
    else:
        groups = itertools.groupby(files, key=lambda p: KINDS[p.suffix.lower()])  # runs of one reader
        texts = itertools.chain.from_iterable(_file_texts(kind, list(group), text_field) for kind, group in groups)
    for text in texts:
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"field '{text_field}' of {source} holds {type(text).__name__} values, not text")
        if text.strip():
            yield text


def _file_texts(kind: str, files: list[Path], text_field: str) -> Iterator[str]:
    if kind == "text":
        for path in files:
            yield from _paragraphs(path)
        return
    if kind == "jsonl":  # read here, not through `datasets`, which training machines may lack
        for path in files:
            yield from _json_lines(path, text_field)
        return
    what = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more {kind} files)"
    data_files = [str(p) for p in files]
    yield from _dataset_texts(what, text_field, kind, data_files=data_files, split="train")


def _json_lines(path: Path, text_field: str) -> Iterator:
    """`text_field` of each row of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"cannot read {path}: line {number} is not JSON ({error.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"rows of {path} have no field '{text_field}'; their fields are: {fields}")
            yield row[text_field]


def _paragraphs(path: Path) -> Iterator[str]:
    """Blocks of non-blank lines, read line by line (undecodable bytes become U+FFFD)."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


def _dataset_texts(what: str, text_field: str, *args, **kwargs) -> Iterator:
    """`text_field` of each row of `datasets.load_dataset(*args, **kwargs, streaming=True)`; read errors
    become UserErrors."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {what} needs the datasets package: pip install datasets") from None
    try:
        batches = iter(datasets.load_dataset(*args, **kwargs, streaming=True).iter(batch_size=TOKENIZE_BATCH))
    except Exception as error:  # unknown id or split, unreachable hub, malformed file, ...
        raise UserError(f"cannot read {what}: {first_line(error)}") from None
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:
            raise UserError(f"cannot read {what}: {first_line(error)}") from None
        if text_field not in batch:
            raise UserError(f"rows of {what} have no field '{text_field}'; their fields are: {', '.join(batch)}")
        yield from batch[text_field]


# ----------------------------------------------------------------------------------------------------------
# Reading: the training loader


def load_manifest(data_dir: str | Path, split: str | None = None) -> dict:
    """The manifest of a prepared folder; with `split`, also check that split has tokens and intact shards."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise UserError(f"data folder not found: {data_dir}")
    path = folder / "manifest.json"
    if not path.is_file():
        raise UserError(f"{data_dir} has no manifest.json: prepare it with `uptrain data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {first_line(error)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest: prepare the data again with `uptrain data prepare`")
    if split is None:
        return manifest
    record = manifest["splits"].get(split)
    if record is None:
        raise UserError(f"{data_dir} has no split '{split}' (it has {', '.join(manifest['splits'])})")
    if record["tokens"] == 0:
        unsplit = split == "val" and manifest.get("val_fraction") == 0
        why = " (it was prepared with a val fraction of 0)" if unsplit else ""
        raise UserError(f"the {split} split of {data_dir} has no tokens{why}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in record["shards"]:
        file = folder / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
            raise UserError(
                f"shard {shard['file']} of {data_dir} is missing or has the wrong size: prepare the data again"
            )
    return manifest


def check_tokenizer(data_dir: str | Path, tokenizer, model_name: str = "the model") -> None:
    """Refuse to train a model on tokens written by a different tokenizer; the message names both and
    what differs (vocabulary, EOS or BOS id)."""
    recorded = load_manifest(data_dir)["tokenizer"]
    if recorded["sha256"] == tokenizer_fingerprint(tokenizer):
        return
    ours = {"vocab": len(tokenizer), "EOS id": tokenizer.eos_token_id, "BOS id": tokenizer.bos_token_id}
    theirs = {"vocab": recorded["vocab_size"], "EOS id": recorded.get("eos_token_id"),
              "BOS id": recorded.get("bos_token_id", ours["BOS id"])}  # older manifests recorded no BOS id
    differences = [f"{key} {theirs[key]} in the data, {ours[key]} in the model"
                   for key in ours if theirs[key] != ours[key]]
    what = ", ".join(differences) or "same sizes and special ids, different vocabulary entries"
    raise UserError(
        f"{data_dir} was tokenized with another tokenizer ({recorded['name'] or 'unnamed'}) than {model_name}'s "
        f"({what}): prepare it again with the model's tokenizer"
    )


def sample_indices(step: int, global_batch_size: int, rank: int, world_size: int) -> list[int]:
    """Global sample indices of optimizer step `step` read by process `rank`: a contiguous 1/world_size slice
    of the step's G indices [step*G, (step+1)*G), so the processes together read exactly the whole batch."""
    if global_batch_size % world_size:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {world_size} processes")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_rank = global_batch_size // world_size
    first = step * global_batch_size + rank * per_rank
    return list(range(first, first + per_rank))


class TokenData:
    """One split of a prepared folder as a single token stream, read through memory maps.

    A sample is `seq_len` consecutive tokens of the stream (documents packed across their EOS tokens).
    The stream has n = num_sequences(seq_len, block_offset) = (tokens - max(block_offset - 1, 0)) // seq_len
    slots. Global sample g (counted over all steps and processes) is slot k = perm_e[g % n] of epoch
    e = g // n, perm_e = numpy.random.default_rng([seed, e]).permutation(n), and starts at token
    k*seq_len + o: o = 0 when block_offset <= 1, else o = default_rng([seed, g, 1]).integers(block_offset),
    so block boundaries fall at varying places in the text (the reference code's random first-block offset)
    and a sample never runs past the end of the stream.
    """

    MAX_OPEN_SHARDS = 128  # memory maps kept open at once (each holds a file descriptor)

    def __init__(self, data_dir: str | Path, split: str):
        self.folder, self.split = Path(data_dir), split
        self.manifest = load_manifest(data_dir, split)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.files = [shard["file"] for shard in self.manifest["splits"][split]["shards"]]
        sizes = [shard["tokens"] for shard in self.manifest["splits"][split]["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (shards + 1,): shard i = [o_i, o_i+1)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._permutation_key, self._permutation = None, None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, index: int) -> np.memmap:
        if index in self._open:
            self._open.move_to_end(index)
        else:
            if len(self._open) >= self.MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[index] = np.memmap(self.folder / self.files[index], dtype=self.dtype, mode="r")
        return self._open[index]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64, across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"cannot read tokens [{start}, {start + length}) of a stream of {len(self)}")
        out = np.empty(length, dtype=np.int64)  # (length,)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        position, filled = start, 0
        while filled < length:
            local = position - int(self.offsets[shard])
            take = min(length - filled, int(self.offsets[shard + 1]) - position)
            out[filled: filled + take] = self._shard(shard)[local: local + take]
            position, filled, shard = position + take, filled + take, shard + 1
        return out

    def num_sequences(self, seq_len: int, block_offset: int = 0) -> int:
        """Slots per epoch: the last one, shifted by up to block_offset - 1 tokens, still fits the stream."""
        if seq_len < 1 or block_offset < 0:
            raise ValueError(f"need seq_len >= 1 and block_offset >= 0, got {seq_len} and {block_offset}")
        return (len(self) - max(block_offset - 1, 0)) // seq_len

    def _order(self, seed: int, epoch: int, n: int) -> np.ndarray:
        """perm_e, cached for the current epoch (int32 when it fits: same order as permutation(n), half the memory)."""
        if self._permutation_key != (seed, epoch, n):
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # (n,)
            np.random.default_rng([seed, epoch]).shuffle(order)
            self._permutation_key, self._permutation = (seed, epoch, n), order
        return self._permutation

    def start(self, index: int, seq_len: int, seed: int, block_offset: int = 0) -> int:
        """Where global sample `index` starts in the stream (see the class docstring)."""
        n = self.num_sequences(seq_len, block_offset)
        if n < 1:
            need = seq_len + max(block_offset - 1, 0)
            raise UserError(
                f"the {self.split} split of {self.folder} has {len(self)} tokens, "
                f"fewer than the {need} one sample needs"
            )
        epoch, position = divmod(index, n)
        slot = int(self._order(seed, epoch, n)[position])
        offset = int(np.random.default_rng([seed, index, 1]).integers(block_offset)) if block_offset > 1 else 0
        return slot * seq_len + offset

    def batch(self, indices: Iterable[int], seq_len: int, seed: int, block_offset: int = 0) -> torch.LongTensor:
        """The samples of global indices `indices`: (len(indices), seq_len) int64."""
        rows = [self.read(self.start(g, seq_len, seed, block_offset), seq_len) for g in indices]
        if not rows:
            return torch.empty(0, seq_len, dtype=torch.long)
        return torch.from_numpy(np.stack(rows))  # (B, seq_len)

    def windows(self, seq_len: int, max_windows: int | None = None) -> Iterator[torch.LongTensor]:
        """Consecutive non-overlapping (seq_len,) windows from the stream's start, for held-out evaluation:
        len(self) // seq_len of them (at most max_windows)."""
        count = len(self) // seq_len
        if count < 1:
            raise UserError(
                f"the {self.split} split of {self.folder} has {len(self)} tokens, fewer than one window of {seq_len}"
            )
        if max_windows is not None:
            count = min(count, max_windows)
        return (torch.from_numpy(self.read(i * seq_len, seq_len)) for i in range(count))
