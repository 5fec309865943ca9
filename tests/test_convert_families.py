"""Contracts 2-4 for every family: identity invariant, causality, padding, loss, standalone loading."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import load_block_model as load
from conftest import padded_positions
from families import FAMILIES

VOCAB = 128


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_invariant(family, tiny_source, run_cli, tmp_path):
    """Block length 1 with every layer in the block decoder is the source model itself (contract 4)."""
    source_folder, source = tiny_source(family)
    layers = source.config.num_hidden_layers
    result = run_cli("convert", source_folder, tmp_path / "id", "--block-length", 1, "--block-layers", layers)
    assert result.exit_code == 0, result.output
    model = load(tmp_path / "id")

    torch.manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    with torch.no_grad():
        expected = source(ids).logits
        expected_padded = source(ids, attention_mask=mask, position_ids=padded_positions(mask)).logits
        got = model(ids).logits
        got_padded = model(ids, attention_mask=mask).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(got_padded[real], expected_padded[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family, converted):
    """Changing tokens after position t never changes logits[:, :t+1] (contract 3)."""
    model = load(converted(family))
    torch.manual_seed(2)
    ids = torch.randint(4, VOCAB, (2, 15))
    with torch.no_grad():
        logits = model(ids).logits
        for t in range(ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(4, VOCAB, changed[:, t + 1 :].shape)
            other = model(changed).logits
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_and_loss(family, converted):
    """A left-padded row scores its tokens exactly as when alone; `loss` is the mean next-token CE (contract 2)."""
    model = load(converted(family))
    torch.manual_seed(3)
    lengths = [11, 6, 3, 9]
    rows = [torch.randint(4, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), 3)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(row) :], alone, atol=1e-5, rtol=1e-5)

        labels = torch.where(mask.bool(), ids, -100)
        output = model(ids, attention_mask=mask, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.isfinite(output.loss)
    torch.testing.assert_close(output.loss, expected)


STANDALONE = r"""
import json, sys, torch
sys.modules["uptrain"] = None  # importing the toolkit must fail here
from transformers import AutoModelForCausalLM
try:
    import uptrain  # noqa
    raise SystemExit("uptrain importable")
except ImportError:
    pass
jobs = json.loads(sys.argv[1])
out = {}
for name, folder in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.arange(4, 17)[None] % 128
    with torch.no_grad():
        out[name] = model(ids).logits[0].tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_loads_where_toolkit_is_absent(converted, tmp_path):
    """Every family's folder loads through AutoModelForCausalLM with only torch and transformers (contract 1)."""
    jobs = {family: str(converted(family)) for family in FAMILIES}
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, json.dumps(jobs)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = json.loads(result.stdout.strip().splitlines()[-1])
    for family, folder in jobs.items():
        with torch.no_grad():
            expected = load(folder)((torch.arange(4, 17)[None] % 128)).logits[0]
        torch.testing.assert_close(torch.tensor(logits[family]), expected, atol=1e-5, rtol=1e-5)
