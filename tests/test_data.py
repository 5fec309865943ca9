"""Token data: `prepare` against a direct tokenization of each document, and the training loader against
plain reads of the concatenated shards and the documented sample order."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from families import VOCAB, tiny_tokenizer
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from uptrain.data import (
    TokenData,
    check_tokenizer,
    load_manifest,
    prepare,
    sample_indices,
    tokenizer_fingerprint,
)
from uptrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PARAGRAPHS = [
    "The first paragraph.\nIt has two lines.", "Second one, with a literal </s> inside.", "Third:\ttabs  and spaces."
]
ROWS = ["A row of a JSON lines file.", "Another row.", "Row three, the last."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    """One document as prepare must write it: its text tokens, no special tokens, then EOS."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def stream(folder: Path, split: str) -> np.ndarray:
    """A split's shards concatenated, read without the loader."""
    manifest = json.loads((folder / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    parts = [np.fromfile(folder / shard["file"], dtype=dtype) for shard in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def docs(folder: Path, tokenizer) -> list[list[int]]:
    return documents(stream(folder, "train"), tokenizer.eos_token_id)


def documents(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Cut a stream after each EOS; the stream must end with one."""
    assert len(tokens) == 0 or tokens[-1] == eos
    cuts = np.flatnonzero(tokens == eos) + 1
    return [part.tolist() for part in np.split(tokens, cuts)[:-1]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_paragraphs(path: Path, paragraphs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n \n".join(paragraphs) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of every supported file type, one subfolder, a hidden folder and a file to ignore."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text("\n\n" + "\n\n\n  \n".join(PARAGRAPHS) + "\n")
    write_jsonl(folder / "b.jsonl", [{"text": ROWS[0], "id": 1}, {"text": "", "id": 2}, {"text": ROWS[1], "id": 3}])
    pq.write_table(pa.table({"text": ["Parquet row one.", None, "Parquet row two."]}), folder / "c.parquet")
    (folder / "d.json").write_text(json.dumps([{"text": "A JSON array row."}]))
    write_jsonl(folder / "sub" / "e.jsonl", [{"text": ROWS[2]}])
    write_jsonl(folder / ".hidden" / "f.jsonl", [{"text": "never read"}])
    (folder / "notes.md").write_text("not a corpus file")
    expected = PARAGRAPHS + ROWS[:2] + ["Parquet row one.", "Parquet row two.", "A JSON array row.", ROWS[2]]
    return folder, expected


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer):
    """A prepared corpus of ~1,500 train tokens in shards of 64, for the loader tests."""
    tmp = tmp_path_factory.mktemp("packed")
    texts = [f"Document {i}: " + "lorem ipsum dolor " * (i % 5 + 1) for i in range(60)]
    source = write_paragraphs(tmp / "corpus.txt", texts)
    prepare(source, tmp / "data", tokenizer, val_fraction=0.1, shard_tokens=64)
    return tmp / "data"


# ----------------------------------------------------------------------------------------------------------
# prepare


def test_txt_paragraphs_are_documents(tmp_path, tokenizer, corpus):
    folder, _ = corpus
    manifest = prepare(folder / "a.txt", tmp_path / "data", tokenizer, tokenizer_name="tiny", val_fraction=0)
    tokens = stream(tmp_path / "data", "train")
    eos = tokenizer.eos_token_id
    assert documents(tokens, eos) == [encode(tokenizer, p) for p in PARAGRAPHS]
    assert (tokens == eos).sum() == len(PARAGRAPHS)  # the literal "</s>" stayed text
    assert manifest == json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["format"] == "block-uptrain-tokens/1" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"] == {
        "name": "tiny", "sha256": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer), "eos_token_id": eos,
        "bos_token_id": tokenizer.bos_token_id,
    }
    assert manifest["splits"]["train"] == {
        "shards": [{"file": "train-00000.bin", "tokens": len(tokens)}], "tokens": len(tokens), "documents": 3
    }
    assert manifest["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0}
    assert (tmp_path / "data" / "train-00000.bin").stat().st_size == 2 * len(tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the staging folder is gone


def test_folder_of_every_type(tmp_path, tokenizer, corpus):
    folder, expected = corpus
    manifest = prepare(folder, tmp_path / "data", tokenizer, val_fraction=0)
    assert docs(tmp_path / "data", tokenizer) == [encode(tokenizer, t) for t in expected]
    assert manifest["splits"]["train"]["documents"] == len(expected)
    assert manifest["splits"]["train"]["tokens"] == sum(len(encode(tokenizer, t)) for t in expected)


def test_glob_and_text_field(tmp_path, tokenizer, corpus):
    folder, _ = corpus
    prepare(str(folder / "*.jsonl"), tmp_path / "glob", tokenizer, val_fraction=0)
    assert docs(tmp_path / "glob", tokenizer) == [encode(tokenizer, t) for t in ROWS[:2]]

    source = write_jsonl(tmp_path / "content.jsonl", [{"content": t, "meta": 0} for t in ROWS])
    with pytest.raises(UserError, match=r"no field 'text'; their fields are: content, meta"):
        prepare(source, tmp_path / "x", tokenizer)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()
    prepare(source, tmp_path / "content", tokenizer, text_field="content", val_fraction=0)
    assert docs(tmp_path / "content", tokenizer) == [encode(tokenizer, t) for t in ROWS]


def test_split_by_whole_documents_and_deterministic(tmp_path, tokenizer):
    texts = [f"doc {i} " + "xy" * (i % 7) for i in range(300)]
    source = write_paragraphs(tmp_path / "corpus.txt", texts)
    eos = tokenizer.eos_token_id
    runs = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        manifest = prepare(source, tmp_path / run, tokenizer, val_fraction=0.1, seed=seed, shard_tokens=500)
        train, val = stream(tmp_path / run, "train"), stream(tmp_path / run, "val")
        for split, tokens in (("train", train), ("val", val)):
            assert manifest["splits"][split]["tokens"] == len(tokens)
            assert manifest["splits"][split]["documents"] == len(documents(tokens, eos))
        runs[run] = {tuple(d) for d in documents(train, eos)}, {tuple(d) for d in documents(val, eos)}, train, val
    every = {tuple(encode(tokenizer, t)) for t in texts}
    train_docs, val_docs, train, val = runs["a"]
    assert train_docs | val_docs == every and not train_docs & val_docs
    assert 10 <= len(val_docs) <= 60
    assert np.array_equal(train, runs["b"][2]) and np.array_equal(val, runs["b"][3])  # same seed, same bytes
    assert runs["c"][1] != val_docs  # another seed holds out other documents


@pytest.mark.parametrize("val_fraction", [0.01, 0.99])
def test_both_splits_non_empty(tmp_path, tokenizer, val_fraction):
    source = write_paragraphs(tmp_path / "two.txt", ["only two", "documents here"])
    for seed in range(4):
        manifest = prepare(source, tmp_path / f"s{seed}", tokenizer, val_fraction=val_fraction, seed=seed)
        assert manifest["splits"]["train"]["documents"] == manifest["splits"]["val"]["documents"] == 1


def test_shards_and_reads_across_boundaries(tmp_path, tokenizer, corpus):
    folder, _ = corpus
    manifest = prepare(folder, tmp_path / "data", tokenizer, val_fraction=0, shard_tokens=50)
    full = stream(tmp_path / "data", "train")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == -(-len(full) // 50) > 3
    assert [s["file"] for s in shards] == [f"train-{i:05d}.bin" for i in range(len(shards))]
    assert all(s["tokens"] == 50 for s in shards[:-1]) and sum(s["tokens"] for s in shards) == len(full)
    data = TokenData(tmp_path / "data", "train")
    assert len(data) == len(full)
    for start in range(0, len(full), 7):
        for length in (0, 1, 49, 50, 51, 123):
            if start + length <= len(full):
                read = data.read(start, length)
                assert read.dtype == np.int64 and np.array_equal(read, full[start: start + length])
    with pytest.raises(IndexError):
        data.read(len(full) - 3, 4)


def test_uint32_for_large_vocab(tmp_path):
    vocab = {token: i for i, token in enumerate(VOCAB + [f"extra{i}" for i in range(70_000)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("extra\\d+|."), behavior="isolated")
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    source = write_paragraphs(tmp_path / "big.txt", ["ab extra69999 c", "extra5"])
    manifest = prepare(source, tmp_path / "data", big, val_fraction=0)
    assert manifest["dtype"] == "uint32"
    tokens = TokenData(tmp_path / "data", "train").read(0, manifest["splits"]["train"]["tokens"])
    assert tokens.tolist() == encode(big, "ab extra69999 c") + encode(big, "extra5")
    assert max(tokens) > 65535


# ----------------------------------------------------------------------------------------------------------
# the training loader


def test_sample_order_is_the_documented_pure_function(packed):
    data = TokenData(packed, "train")
    seq_len, seed = 16, 3
    n = data.num_sequences(seq_len)
    assert n == len(data) // seq_len > 50
    for epoch in (0, 1):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        starts = [data.start(epoch * n + k, seq_len, seed) for k in range(n)]
        assert starts == (perm * seq_len).tolist()  # every slot once per epoch, in the documented order
    indices = [5, 0, n + 2, 3 * n - 1]
    first = data.batch(indices, seq_len, seed)
    assert first.dtype == torch.long and first.shape == (4, seq_len)
    assert torch.equal(first, TokenData(packed, "train").batch(indices, seq_len, seed))  # a fresh reader agrees
    for row, g in zip(first, indices):
        assert torch.equal(row, torch.from_numpy(data.read(data.start(g, seq_len, seed), seq_len)))
    assert not torch.equal(first, data.batch(indices, seq_len, seed + 1))
    assert data.batch([], seq_len, seed).shape == (0, seq_len)


def test_ranks_partition_the_global_batch(packed):
    data = TokenData(packed, "train")
    for step in (0, 3):
        whole = sample_indices(step, 8, 0, 1)
        assert whole == list(range(8 * step, 8 * step + 8))
        halves = [sample_indices(step, 8, rank, 2) for rank in range(2)]
        quarters = [sample_indices(step, 8, rank, 4) for rank in range(4)]
        assert sum(halves, []) == sum(quarters, []) == whole
        batches = [data.batch(part, 16, 0, block_offset=4) for part in halves]
        assert torch.equal(torch.cat(batches), data.batch(whole, 16, 0, block_offset=4))
    with pytest.raises(ValueError, match="divisible"):
        sample_indices(0, 8, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        sample_indices(0, 8, 2, 2)


def test_block_offsets_stay_in_range_and_inside_the_stream(packed):
    data = TokenData(packed, "train")
    block = 4
    # a seq_len where the last slot ends within block - 1 tokens of the stream's end, so the bound matters
    seq_len = next(s for s in range(10, 60) if len(data) % s < block - 1)
    n = data.num_sequences(seq_len, block)
    assert n == len(data) // seq_len - 1 == (len(data) - (block - 1)) // seq_len
    assert data.num_sequences(seq_len, 1) == data.num_sequences(seq_len, 0) == len(data) // seq_len
    offsets = []
    for epoch in range(3):
        starts = [data.start(epoch * n + k, seq_len, 0, block) for k in range(n)]
        assert sorted(s // seq_len for s in starts) == list(range(n))
        assert max(starts) + seq_len <= len(data)
        offsets += [s % seq_len for s in starts]
    assert set(offsets) == set(range(block))
    rows = data.batch(range(3 * n), seq_len, 0, block)
    assert rows.shape == (3 * n, seq_len)


def test_windows_and_val_split(packed):
    val = TokenData(packed, "val")
    full = val.read(0, len(val))
    windows = list(val.windows(8))
    assert len(windows) == len(val) // 8
    assert torch.equal(torch.cat(windows), torch.from_numpy(full[: len(windows) * 8]))
    assert len(list(val.windows(8, max_windows=2))) == 2
    with pytest.raises(UserError, match="fewer than one window"):
        val.windows(len(val) + 1)
    with pytest.raises(UserError, match="fewer than the"):
        val.batch([0], len(val), 0, block_offset=4)


# ----------------------------------------------------------------------------------------------------------
# tokenizer identity


def test_tokenizer_fingerprint(tmp_path, tokenizer, packed):
    tokenizer.save_pretrained(tmp_path / "source")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "source")
    reloaded.save_pretrained(tmp_path / "converted")  # as a conversion copies it
    again = AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(again)
    check_tokenizer(packed, again)

    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    size = len(tokenizer)
    with pytest.raises(UserError, match=rf"another tokenizer .*\(vocab {size} in the data, {size + 1} in the model\)"):
        check_tokenizer(packed, other)

    shifted = tiny_tokenizer()
    shifted.eos_token = "<pad>"  # same vocabulary, another EOS id: what two transformers versions once did
    with pytest.raises(UserError, match=r"\(EOS id 2 in the data, 3 in the model\)"):
        check_tokenizer(packed, shifted)


# ----------------------------------------------------------------------------------------------------------
# user mistakes


def test_source_errors(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^source not found: \./missing/corpus\.jsonl$"):
        prepare("./missing/corpus.jsonl", out, tokenizer)
    with pytest.raises(UserError, match="source not found"):
        prepare("missing/corpus.txt", out, tokenizer)
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "notes.md").write_text("hello")
    with pytest.raises(UserError, match="folder papers has no .txt, .jsonl, .json or .parquet files"):
        prepare("papers", out, tokenizer)
    with pytest.raises(UserError, match="no .txt, .jsonl, .json or .parquet files match"):
        prepare("papers/*.txt", out, tokenizer)
    with pytest.raises(UserError, match="not a .txt, .jsonl, .json or .parquet file"):
        prepare("papers/notes.md", out, tokenizer)
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    with pytest.raises(UserError, match="the corpus is empty"):
        prepare("blank.txt", out, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "papers"]  # nothing half-written


def test_option_errors(tmp_path, tokenizer):
    source = write_paragraphs(tmp_path / "corpus.txt", ["one", "two"])
    no_eos = tiny_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(UserError, match="has no EOS token"):
        prepare(source, tmp_path / "out", no_eos)
    with pytest.raises(UserError, match="val fraction"):
        prepare(source, tmp_path / "out", tokenizer, val_fraction=1.0)
    prepare(source, tmp_path / "out", tokenizer)
    with pytest.raises(UserError, match="not empty"):
        prepare(source, tmp_path / "out", tokenizer)
    manifest = prepare(source, tmp_path / "out", tokenizer, val_fraction=0, overwrite=True)
    assert manifest["splits"]["train"]["documents"] == 2


def test_loader_errors(tmp_path, tokenizer):
    with pytest.raises(UserError, match="data folder not found"):
        TokenData(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no manifest.json: prepare it with `uptrain data prepare`"):
        load_manifest(tmp_path / "empty")
    source = write_paragraphs(tmp_path / "corpus.txt", ["one", "two"])
    prepare(source, tmp_path / "data", tokenizer, val_fraction=0)
    with pytest.raises(UserError, match=r"val split of .* has no tokens \(it was prepared with a val fraction of 0\)"):
        TokenData(tmp_path / "data", "val")
    with pytest.raises(UserError, match="no split 'test'"):
        TokenData(tmp_path / "data", "test")
    with open(tmp_path / "data" / "train-00000.bin", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(UserError, match="wrong size"):
        TokenData(tmp_path / "data", "train")


@pytest.mark.slow
def test_works_without_datasets(tmp_path):
    """Training machines may lack `datasets`: text and JSON-lines corpora and the loader must not need it;
    parquet says what it needs. (A stand-in tokenizer keeps transformers out of the subprocess, which would
    take seconds to import.)"""
    source = write_paragraphs(tmp_path / "corpus.txt", ["one", "two"])
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "three"}, {"text": "four"}])
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    script = """
import sys
sys.modules["datasets"] = None  # import datasets now fails
from uptrain.data import TokenData, prepare
from uptrain.errors import UserError

class Letters:  # the interface prepare uses: one id per letter, EOS 0
    eos_token_id, bos_token_id = 0, None
    def get_vocab(self): return {chr(96 + i): i for i in range(1, 27)} | {"</s>": 0}
    def __len__(self): return 27
    def __call__(self, texts, **kwargs): return {"input_ids": [[ord(c) - 96 for c in t] for t in texts]}

prepare(sys.argv[1], sys.argv[3], Letters(), val_fraction=0)
print(TokenData(sys.argv[3], "train").read(0, 8).tolist())
prepare(sys.argv[2], sys.argv[3] + "-jsonl", Letters(), val_fraction=0)
print(TokenData(sys.argv[3] + "-jsonl", "train").read(0, 11).tolist())
try:
    prepare(sys.argv[4], sys.argv[3] + "-parquet", Letters())
except UserError as error:
    print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script, source, tmp_path / "rows.jsonl", tmp_path / "data", tmp_path / "rows.parquet"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[15, 14, 5, 0, 20, 23, 15, 0]",  # "one", EOS, "two", EOS
        "[20, 8, 18, 5, 5, 0, 6, 15, 21, 18, 0]",  # "three", EOS, "four", EOS
        f"reading {tmp_path / 'rows.parquet'} needs the datasets package: pip install datasets",
    ]


def test_malformed_json_lines(tmp_path, tokenizer):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"rows.jsonl: line 3 is not JSON"):
        prepare(source, tmp_path / "out", tokenizer)
    source.write_text('["a list"]\n')
    with pytest.raises(UserError, match=r"have no field 'text'; their fields are: list"):
        prepare(source, tmp_path / "out", tokenizer)
