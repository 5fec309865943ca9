"""protocol.py's real-model setup, end to end on CPU with a tiny Llama: the source fine-tuned
and uptrained on the same tokens, then source, fine-tune, uptrained model and fresh conversion scored on the same
windows, and greedy samples from each. Real subprocesses of the CLI, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from families import save_tiny_model  # tests/, on pytest's path (pyproject.toml)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEXT = (REPO / "tests" / "data" / "sample.txt").read_text()
TINY = ["seq_len=32", "micro_batch_size=2", "global_batch_size=4", "max_steps=3", "warmup_steps=1", "eval_every=3",
        "eval_windows=2", "save_every=3", "precision=fp32", "compile=false", "fast_loss=false", "tracker=none",
        "convert.block_layers=2", "log_every=1"]


def make_corpus(folder: Path) -> Path:
    """The builder's layout: train/ and ood/ text files, corpus.json."""
    paragraphs = [p for p in TEXT.split("\n\n") if p.strip()]
    (folder / "train").mkdir(parents=True)
    (folder / "ood").mkdir()
    (folder / "train" / "a.txt").write_text("\n\n".join(paragraphs * 8))
    (folder / "ood" / "b.txt").write_text("\n\n".join(reversed(paragraphs)))
    (folder / "corpus.json").write_text("{}")
    return folder


@pytest.mark.slow
def test_smollm2_setup_fine_tunes_uptrains_and_scores_every_model_on_the_same_windows(tmp_path):
    source = tmp_path / "source"
    save_tiny_model("llama", source)
    corpus = make_corpus(tmp_path / "corpus")
    work = tmp_path / "work"
    command = [sys.executable, HERE / "protocol.py", work, "--corpus", corpus,
               "--setup", "smollm2", "--source", source, "--device", "cpu", "--score-windows", "2",
               "--score-seq-len", "32", "--stages", "data,vanilla-finetune,uptrain-ce,score,samples",
               "--set", *TINY, "--out", tmp_path / "out"]
    done = subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    scores = json.loads((work / "scores.json").read_text())
    assert set(scores) == {"source", "vanilla-finetune", "uptrain-ce", "fresh-conversion"}
    for name, splits in scores.items():
        assert set(splits) == {"heldout", "ood"}
        assert all(0 < split["loss"] < 20 for split in splits.values()), (name, splits)
    # the vanilla fine-tune is the source trained as it is: a vanilla model, not a block one
    config = json.loads((work / "runs" / "vanilla-finetune" / "final" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert json.loads((work / "runs" / "uptrain-ce" / "final" / "config.json").read_text())["model_type"] != "llama"
    # both runs saw the same tokens
    logs = {name: [json.loads(line) for line in (work / "runs" / name / "train_log.jsonl").read_text().splitlines()]
            for name in ("vanilla-finetune", "uptrain-ce")}
    last_steps = {name: max(r["step"] for r in records) for name, records in logs.items()}
    assert last_steps == {"vanilla-finetune": 3, "uptrain-ce": 3}
    samples = json.loads((work / "samples.json").read_text())
    assert set(samples) == set(scores) and all(len(s) == 4 for s in samples.values())
    assert (tmp_path / "out" / "recovery-results.tar.gz").is_file()
