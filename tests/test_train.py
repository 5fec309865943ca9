"""The uptraining loop: exact resume after SIGKILL, distillation, bad input, NaN.

Several processes: test_multi_process.py."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from families import tiny_tokenizer
from safetensors.torch import load_file

from uptrain.checkpoints import complete_checkpoints, resume_point
from uptrain.data import prepare
from uptrain.objective import distillation_loss
from uptrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
WORDS = "the a of block token model layer cache fast slow text data train step loss window prefix".split()


def corpus_file(path: Path, documents: int = 300, seed: int = 0) -> Path:
    """Paragraphs of pseudo-random words: enough text for a few epochs of tiny batches."""
    rng = torch.Generator().manual_seed(seed)
    paragraphs = []
    for _ in range(documents):
        picks = torch.randint(len(WORDS), (int(torch.randint(8, 40, (1,), generator=rng)),), generator=rng)
        paragraphs.append(" ".join(WORDS[i] for i in picks) + ".")
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    prepare(
        str(corpus_file(folder / "corpus.txt")),
        folder / "tokens",
        tiny_tokenizer(),
        val_fraction=0.1,
        tokenizer_name="tiny",
    )
    return folder / "tokens"


def tiny_overrides(source, data, out, **extra):
    values = dict(
        source=source,
        data=data,
        output_dir=out,
        seq_len=64,
        micro_batch_size=4,
        global_batch_size=8,
        max_steps=12,
        warmup_steps=2,
        eval_every=6,
        eval_windows=4,
        save_every=4,
        keep_checkpoints=5,
        log_every=1,
        tracker="none",
        lr=1e-3,
        **{"convert.block_layers": 2},
    )
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def run_train(overrides, **popen):
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "train", str(TINY_RECIPE), *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def final_weights(out: Path) -> dict:
    weights = {}
    for path in (out / "final").glob("*.safetensors"):
        weights.update(load_file(path))
    return weights


def losses(out: Path) -> list[float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    by_step = {}
    for line in lines:
        record = json.loads(line)
        by_step[record["step"]] = record["train/loss"]
    return [by_step[step] for step in sorted(by_step)]


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_source, tiny_data, tmp_path):
    """Checkpoints are written silently (a tied head saved once, as safetensors expects, without accelerate's
    warning about removed shared tensors) and a run killed mid-way resumes into exactly the uninterrupted run."""
    source, _ = tiny_source("llama")
    extra = dict(max_steps=40, save_every=5, seq_len=128, micro_batch_size=8, global_batch_size=16)
    straight = run_train(tiny_overrides(source, tiny_data, tmp_path / "straight", **extra))
    _, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-2000:]
    assert "shared tensor" not in stderr, stderr[-2000:]

    killed = run_train(tiny_overrides(source, tiny_data, tmp_path / "killed", **extra))
    first = tmp_path / "killed" / "checkpoints" / "step-00000005" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    left = complete_checkpoints(tmp_path / "killed")
    assert left and int(left[-1].name.removeprefix("step-")) < 40
    assert not (tmp_path / "killed" / "final").exists()

    resumed = run_train(tiny_overrides(source, tiny_data, tmp_path / "killed", **extra))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-2000:]
    assert "shared tensor" not in stderr, stderr[-2000:]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


def test_a_tied_head_is_checkpointed_once_and_restored(tiny_source, tiny_data, tmp_path, run_cli):
    """The checkpoint holds the tied head under one name; loading it gives the head back, still tied."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    from uptrain.objective import NextTokenObjective

    source, _ = tiny_source("llama")
    result = run_cli("train", TINY_RECIPE, *tiny_overrides(source, tiny_data, tmp_path, max_steps=2, save_every=2))
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")
    assert "model.token_decoder.model.embed_tokens.weight" in saved
    assert "model.token_decoder.lm_head.weight" not in saved
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", trust_remote_code=True, dtype=torch.float32)
    # as `accelerator.load_state` reads it
    load_model(NextTokenObjective(model), tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")
    head = model.token_decoder.lm_head.weight
    assert head is model.token_decoder.get_input_embeddings().weight
    assert torch.equal(head, saved["model.token_decoder.model.embed_tokens.weight"])


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step-00000004").mkdir(parents=True)
    (folder / "step-00000004" / "trainer_state.json").write_text('{"step": 4}')
    (folder / ".step-00000008.partial").mkdir()  # a crash while saving
    (folder / "step-00000012").mkdir()  # renamed but without its state file
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"])
    assert resume_point(recipe) == folder / "step-00000004"


def test_distillation_loss_against_float64():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(7, (2, 5))
    loss, ce = distillation_loss(student, teacher, labels, weight=0.25, temperature=2.0)
    s, t = student[:, :-1].double() / 2, teacher[:, :-1].double() / 2
    p_t = t.softmax(-1)
    kl = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    expected_ce = torch.nn.functional.cross_entropy(student[:, :-1].double().reshape(-1, 7), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ce.double(), expected_ce)
    torch.testing.assert_close(loss.double(), 0.75 * expected_ce + 0.25 * 4 * kl)


def test_distillation_run(tiny_source, tiny_data, tmp_path, run_cli):
    source, _ = tiny_source("llama")
    result = run_cli(
        "train",
        TINY_RECIPE,
        *tiny_overrides(
            source,
            tiny_data,
            tmp_path,
            **{"max_steps": 4, "distill.enabled": "true", "distill.weight": 0.5, "distill.temperature": 2.0},
        ),
    )
    assert result.exit_code == 0, result.output
    training = json.loads((tmp_path / "final" / "training.json").read_text())
    assert training["steps"] == 4


def test_bad_inputs(tiny_source, tiny_data, tmp_path, run_cli):
    source, _ = tiny_source("llama")

    def refused(*overrides, **extra):
        result = run_cli(
            "train",
            TINY_RECIPE,
            *tiny_overrides(source, extra.pop("data", tiny_data), tmp_path / "o", **extra),
            *overrides,
        )
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()  # progress bars of a conversion may come first
        assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
        assert not any(line.startswith("error: ") for line in lines[:-1])
        return lines[-1]

    assert "data folder not found" in refused(data=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "has no manifest.json" in refused(data=tmp_path / "empty")
    assert "seq_len 30 is not a multiple of the block length 4" in refused(seq_len=30)

    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    prepare(str(corpus_file(tmp_path / "c.txt", documents=20)), tmp_path / "other", other, tokenizer_name="other-tok")
    message = refused(data=tmp_path / "other")
    assert "another tokenizer (other-tok" in message and "than " + str(tmp_path / "o" / "converted") in message


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_source, tiny_data, tmp_path, run_cli):
    source, _ = tiny_source("llama")
    result = run_cli(
        "train",
        TINY_RECIPE,
        *tiny_overrides(source, tiny_data, tmp_path, lr="1e30", grad_clip=0, save_every=1, max_steps=12),
    )
    assert result.exit_code == 1, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.split(" became ")[0] in ("error: training loss", "error: the gradient norm")
    assert "Traceback" not in result.stderr and "the last good checkpoint is" in message
    kept = complete_checkpoints(tmp_path)
    assert kept and str(kept[-1]) in message
    assert not (tmp_path / "final").exists()


def test_nan_gradients_stop_the_run_before_any_update_and_from_scratch_has_none(tmp_path, run_cli):
    """A deep model whose padding row (the end-of-text id) is zero, as transformers initialises it: the first
    sequence that starts with that token has a finite loss and NaN gradients (test_scratch.py). Training it as
    it is stops before the update; from scratch, its random weights train that row and stay finite."""
    from test_scratch import DEEP
    from transformers import LlamaConfig, LlamaForCausalLM

    source = tmp_path / "deep"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**DEEP)).save_pretrained(source)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # SmolLM2's convention
    tokenizer.save_pretrained(source)
    rng = torch.Generator().manual_seed(0)  # one- or two-letter documents: every third token is the end of text
    (tmp_path / "short.txt").write_text(
        "\n\n".join(WORDS[int(i)][: 1 + int(i) % 2] for i in torch.randint(len(WORDS), (3000,), generator=rng))
    )
    prepare(str(tmp_path / "short.txt"), tmp_path / "tokens", tokenizer, val_fraction=0.1, tokenizer_name="tiny")
    settings = dict(architecture="vanilla", max_steps=4, save_every=1, eval_every=4)

    result = run_cli("train", TINY_RECIPE, *tiny_overrides(source, tmp_path / "tokens", tmp_path / "as-is", **settings))
    assert result.exit_code == 1, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the gradient norm became nan (loss ") and "stopped before updating" in message
    for checkpoint in complete_checkpoints(tmp_path / "as-is"):  # every kept checkpoint is finite
        assert all(torch.isfinite(t).all() for t in load_file(next(checkpoint.rglob("*.safetensors"))).values())

    result = run_cli(
        "train",
        TINY_RECIPE,
        *tiny_overrides(source, tmp_path / "tokens", tmp_path / "scratch", from_scratch="true", **settings),
    )
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "scratch" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in log)


def test_fast_and_plain_loss_give_the_same_run(tiny_source, tiny_data, tmp_path, run_cli):
    """The whole loop (accumulation, clipping, AdamW) on the chunked loss against the full-logits loss."""
    source, _ = tiny_source("llama")
    curves = {}
    for fast in ("true", "false"):
        result = run_cli("train", TINY_RECIPE, *tiny_overrides(source, tiny_data, tmp_path / fast, fast_loss=fast))
        assert result.exit_code == 0, result.output
        curves[fast] = losses(tmp_path / fast)
    assert len(curves["true"]) == 12 and curves["true"][-1] < curves["true"][0]
    torch.testing.assert_close(torch.tensor(curves["true"]), torch.tensor(curves["false"]), rtol=1e-4, atol=0)


def test_vanilla_training_starts_from_the_source_and_exports_a_plain_model(tiny_source, tiny_data, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uptrain.data import TokenData, sample_indices

    source, model = tiny_source("qwen2")  # no dropout, so the first step's loss is the source's own
    result = run_cli(
        "train",
        TINY_RECIPE,
        *tiny_overrides(source, tiny_data, tmp_path, architecture="vanilla", max_steps=3, save_every=3),
    )
    assert result.exit_code == 0, result.output
    first_batch = TokenData(tiny_data, "train").batch(sample_indices(0, 8, 0, 1), 64, seed=0)
    with torch.no_grad():
        expected = model(first_batch, labels=first_batch).loss  # the source's own loss, computed by transformers
    assert losses(tmp_path)[0] == pytest.approx(float(expected), rel=1e-5)

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # no remote code: a plain transformers folder
    assert type(trained) is type(model)
    assert AutoTokenizer.from_pretrained(tmp_path / "final").get_vocab() == tiny_tokenizer().get_vocab()
    assert json.loads((tmp_path / "final" / "training.json").read_text())["architecture"] == "vanilla"
    moved = [name for name, p in trained.state_dict().items() if not torch.equal(p, model.state_dict()[name])]
    assert moved


def layer_distance(a: dict, b: dict, name: str) -> float:
    return float((a[name] - b[name]).norm() / b[name].norm())


@pytest.mark.parametrize("architecture,converted_source", [("vanilla", False), ("block", False), ("block", True)])
def test_from_scratch(architecture, converted_source, tiny_source, converted, tiny_data, tmp_path, run_cli):
    """Random weights of the source's shape: far from the source's, while 4 steps from pretrained stay close.
    (seed 1: the tiny sources are themselves seed-0 random inits of their configs.)"""
    from transformers import AutoModelForCausalLM

    source, model = tiny_source("llama")
    source = converted("llama") if converted_source else source
    runs = {}
    for scratch in ("true", "false"):
        out = tmp_path / scratch
        result = run_cli(
            "train",
            TINY_RECIPE,
            *tiny_overrides(
                source,
                tiny_data,
                out,
                architecture=architecture,
                from_scratch=scratch,
                max_steps=4,
                save_every=4,
                seed=1,
            ),
        )
        assert result.exit_code == 0, result.output
        remote = architecture == "block"
        runs[scratch] = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=remote).state_dict()
        assert json.loads((out / "final" / "training.json").read_text())["from_scratch"] == (scratch == "true")
    name = next(n for n in runs["true"] if n.endswith("layers.0.mlp.down_proj.weight"))
    assert layer_distance(runs["true"], runs["false"], name) > 1.0  # independent draws: about sqrt(2)
    start = (
        model.state_dict()
        if architecture == "vanilla"
        else AutoModelForCausalLM.from_pretrained(converted("llama"), trust_remote_code=True).state_dict()
    )
    assert layer_distance(runs["false"], start, name) < 0.3


@pytest.mark.slow
def test_compiled_decoders_give_the_eager_run(tiny_source, tiny_data, tmp_path, run_cli):
    """`compile=true` (the GPU recipe's setting) on the CPU: the same loss curve as the eager loop."""
    source, _ = tiny_source("llama")
    curves = {}
    for compiled in ("true", "false"):
        result = run_cli(
            "train",
            TINY_RECIPE,
            *tiny_overrides(
                source, tiny_data, tmp_path / compiled, compile=compiled, max_steps=3, save_every=3, eval_every=3
            ),
        )
        assert result.exit_code == 0, result.output
        curves[compiled] = losses(tmp_path / compiled)
    torch.testing.assert_close(torch.tensor(curves["true"]), torch.tensor(curves["false"]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("compiled, tuning", [(True, False), (True, True), (False, True)])
def test_compile_tuning_turns_on_inductors_kernel_tuning(compiled, tuning, tiny_source, tiny_data, tmp_path):
    """`compile_tuning=true` is inductor's coordinate-descent tuning, set before the first step compiles;
    without `compile` there is nothing to tune."""
    import torch._inductor.config as inductor

    from uptrain.train import Trainer

    source, _ = tiny_source("llama")
    recipe = load_recipe(
        TINY_RECIPE,
        tiny_overrides(source, tiny_data, tmp_path, compile=str(compiled).lower(), compile_tuning=str(tuning).lower()),
    )
    with inductor.patch(coordinate_descent_tuning=False):  # inductor's own patch: restored after the test
        Trainer(recipe).setup()
        assert inductor.coordinate_descent_tuning is (compiled and tuning)


def test_mfu_is_logged_where_the_card_is_known(tiny_source, tiny_data, tmp_path, run_cli, monkeypatch):
    """On a GPU with a known peak the log carries MFU = step tokens/s x FLOPs per token / peak (per process)."""
    from transformers import AutoModelForCausalLM

    import uptrain.train
    from uptrain.flops import training_flops_per_token

    monkeypatch.setattr(uptrain.train, "peak_flops", lambda device: 1e9)
    source, _ = tiny_source("llama")
    result = run_cli("train", TINY_RECIPE, *tiny_overrides(source, tiny_data, tmp_path, max_steps=2, save_every=2))
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", trust_remote_code=True)
    flops = training_flops_per_token(model, 64)["total"]
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    for record in records:
        assert record["train/mfu"] == pytest.approx(record["train/step_tokens_per_s"] * flops / 1e9)
        assert record["train/step_tokens_per_s"] == pytest.approx(8 * 64 / record["train/step_seconds"])


def test_an_unknown_head_falls_back_to_full_logits(tiny_source, tiny_data, tmp_path, run_cli, monkeypatch):
    from uptrain import architectures

    monkeypatch.delitem(architectures.LOGIT_TRANSFORMS, "granite")  # granite divides its logits by 2
    source, _ = tiny_source("granite")
    with pytest.warns(UserWarning, match="fast_loss is off: the model's final states through its LM head differ"):
        result = run_cli(
            "train", TINY_RECIPE, *tiny_overrides(source, tiny_data, tmp_path / "a", max_steps=2, save_every=2)
        )
    assert result.exit_code == 0, result.output
    plain = run_cli(
        "train",
        TINY_RECIPE,
        *tiny_overrides(source, tiny_data, tmp_path / "b", max_steps=2, save_every=2, fast_loss="false"),
    )
    assert plain.exit_code == 0, plain.output
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # trained on full logits, not on a wrong head


def test_weight_decay_applies_to_matrices_only(tiny_source):
    from uptrain.train import param_groups

    _, model = tiny_source("llama")
    groups = param_groups(model, 0.1)
    assert sorted(group["weight_decay"] for group in groups) == [0.0, 0.1]
    for group in groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
