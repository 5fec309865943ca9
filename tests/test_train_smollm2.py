"""Real weights: 30 uptraining steps lower the held-out loss of the freshly converted SmolLM2-135M."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_block_model

from uptrain.corpus import write_docstring_corpus
from uptrain.data import TokenData, prepare

pytestmark = pytest.mark.slow  # real weights

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def held_out_loss(folder: Path, data: Path, seq_len: int, windows: int) -> float:
    model = load_block_model(folder)
    total = count = 0.0
    for window in TokenData(data, "val").windows(seq_len, windows):
        logits = model(window[None]).logits[0]
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    return total / count


def test_thirty_steps_lower_the_held_out_loss(smollm2, run_cli, tmp_path):
    _, folder, _, tokenizer = smollm2
    data = tmp_path / "data"
    prepare(
        str(write_docstring_corpus(tmp_path / "corpus.jsonl")),
        data,
        tokenizer,
        val_fraction=0.1,
        tokenizer_name=str(folder),
    )
    out = tmp_path / "run"
    overrides = [
        f"source={folder}",
        f"data={data}",
        f"output_dir={out}",
        "seq_len=64",
        "micro_batch_size=2",
        "global_batch_size=2",
        "max_steps=30",
        "eval_every=30",
        "eval_windows=8",
        "save_every=30",
        "tracker=none",
    ]
    result = run_cli("train", REPO / "recipes" / "tiny-cpu.yaml", *overrides)
    assert result.exit_code == 0, result.output

    before = held_out_loss(out / "converted", data, 64, 8)
    training = json.loads((out / "final" / "training.json").read_text())
    after = training["eval"]["val_loss"]
    assert math.isclose(held_out_loss(out / "final", data, 64, 8), after, rel_tol=1e-4)
    print(f"held-out loss of the fresh conversion {before:.3f}, after 30 steps {after:.3f}")
    assert after < before - 1.0, (before, after)
