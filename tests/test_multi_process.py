"""Several processes through accelerate, with the shipped configs: DDP and FSDP against one process.

Real `accelerate launch --config_file recipes/accelerate/{ddp,fsdp}.yaml` runs of 2 processes on CPU (gloo).
DDP runs as it ships, with `ACCELERATE_USE_CPU` (accelerate's own CPU mode, DDP over gloo). accelerate
enables FSDP on accelerators only, so FSDP runs through `fsdp_on_cpu.py`, which marks the CPU state as
FSDP; from there it is accelerate's FSDP2 code (`fully_shard` per decoder layer, sharded checkpoints
through torch.distributed.checkpoint, `get_state_dict` for the export), as on GPUs.

Tolerances: every run sees the same micro-batches in float32, so the runs differ only by the order of
float sums (gradient reduction across processes): losses within 1e-5 relative and weights within 1e-5 of
each tensor's scale after 8 steps (measured: losses equal to the printed digit, weights 7e-7 apart).
A run resumed in the layout that wrote the checkpoint ends bitwise equal to the uninterrupted one.
"""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from test_train import REPO, TINY_RECIPE, final_weights, losses, tiny_data, tiny_overrides  # noqa: F401 (fixture)

CONFIGS = REPO / "recipes" / "accelerate"
FSDP_ON_CPU = Path(__file__).parent / "fsdp_on_cpu.py"
STEPS = {"max_steps": 8, "save_every": 4, "eval_every": 4}
DISTILL = {"distill.enabled": "true", "distill.weight": 0.5, "distill.temperature": 2.0}
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, overrides: list[str]):
    """`accelerate launch --config_file recipes/accelerate/CONFIG.yaml --num_processes 2 SCRIPT train ...`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # DDP over gloo; FSDP_ON_CPU sets it too
    script = FSDP_ON_CPU if config == "fsdp" else REPO / "cli.py"
    command = [
        "accelerate",
        "launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(script),
        "train",
        str(TINY_RECIPE),
        *overrides,
    ]
    return subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def trained(config: str, overrides: list[str]) -> None:
    result = launch(config, overrides)
    assert result.returncode == 0, result.stderr[-3000:]


def log(out: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [record[key] for record in records if key in record]


def training(out: Path) -> dict:
    return json.loads((out / "final" / "training.json").read_text())


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_close_weights(a: dict, b: dict, rtol: float = RTOL) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        scale = b[name].abs().max().clamp(min=1e-12)
        assert float((value - b[name]).abs().max() / scale) <= rtol, name


def truncated(out: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as it stood at `step`: later checkpoints, log lines and the export removed."""
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "final")
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    lines = (copy / "train_log.jsonl").read_text().splitlines()
    (copy / "train_log.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))
    return copy


def fsdp_overrides(source, data, out) -> list[str]:
    return tiny_overrides(source, data, out, **STEPS, **DISTILL)


@pytest.fixture(scope="module")
def runs(tiny_source, tiny_data, tmp_path_factory, run_cli):  # noqa: F811
    """8 steps of the tiny recipe: DDP against one process; FSDP, with distillation (a frozen teacher beside
    the sharded student), against one process with distillation. Output folders by name."""
    source, _ = tiny_source("llama")
    root = tmp_path_factory.mktemp("multi")
    folders = {name: root / name for name in ("one", "ddp", "one-distill", "fsdp")}
    for name in ("one", "one-distill"):
        overrides = (
            fsdp_overrides(source, tiny_data, folders[name])
            if name == "one-distill"
            else tiny_overrides(source, tiny_data, folders[name], **STEPS)
        )
        result = run_cli("train", TINY_RECIPE, *overrides)
        assert result.exit_code == 0, result.output
    trained("ddp", tiny_overrides(source, tiny_data, folders["ddp"], **STEPS))
    trained("fsdp", fsdp_overrides(source, tiny_data, folders["fsdp"]))
    return folders


@pytest.mark.slow  # accelerate launches
def test_ddp_and_fsdp_give_the_single_process_run(runs):
    for one in (runs["one"], runs["one-distill"]):
        assert len(losses(one)) == 8 and losses(one)[-1] < losses(one)[0]
    assert losses(runs["one-distill"])[1:] != losses(runs["one"])[1:]  # the teacher changed the gradients
    for name, one in (("ddp", runs["one"]), ("fsdp", runs["one-distill"])):
        out = runs[name]
        assert (out / "checkpoints" / "step-00000008" / "random_states_1.pkl").is_file()  # a second process ran
        torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(one)), rtol=RTOL, atol=0)
        torch.testing.assert_close(
            torch.tensor(log(out, "eval/val_loss")), torch.tensor(log(one, "eval/val_loss")), rtol=RTOL, atol=0
        )
        assert log(out, "train/lr") == log(one, "train/lr")  # one schedule step per optimizer step, any processes
        assert_close_weights(final_weights(out), final_weights(one))
    assert training(runs["one"])["distributed"] == {"type": "NO", "processes": 1}
    assert training(runs["ddp"])["distributed"] == {"type": "MULTI_CPU", "processes": 2}
    config = json.loads((runs["fsdp"] / "final" / "config.json").read_text())
    layers = sum(config[name]["num_hidden_layers"] for name in ("block_decoder", "token_decoder"))
    units = {"FSDPLlamaDecoderLayer": layers, "FSDPNextTokenObjective": 1}  # each decoder layer, and the root
    assert training(runs["fsdp"])["distributed"] == {"type": "FSDP", "processes": 2, "fsdp_units": units}
    sharded = runs["fsdp"] / "checkpoints" / "step-00000008" / "pytorch_model_fsdp_0"
    assert len(list(sharded.glob("*.distcp"))) == 2  # FSDP checkpoints: one shard file per process


@pytest.mark.slow  # accelerate launches
def test_fsdp_export_is_the_usual_folder_and_holds_the_trained_weights(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    fsdp, one = runs["fsdp"] / "final", runs["one-distill"] / "final"
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in one.iterdir())
    model = AutoModelForCausalLM.from_pretrained(fsdp, trust_remote_code=True, dtype=torch.float32)  # one device
    assert model.token_decoder.lm_head.weight is model.token_decoder.get_input_embeddings().weight  # still tied
    # the trained weights, as the last sharded checkpoint holds them (read back without the trainer)
    saved = runs["fsdp"] / "checkpoints" / "step-00000008"
    dcp_to_torch_save(saved / "pytorch_model_fsdp_0", tmp_path / "step-8.pt")
    trained_state = {
        name.removeprefix("model."): value for name, value in torch.load(tmp_path / "step-8.pt")["model"].items()
    }
    loaded = model.state_dict()
    assert loaded.keys() == trained_state.keys()
    for name in loaded:
        assert torch.equal(loaded[name], trained_state[name]), name


@pytest.mark.slow  # accelerate launches
def test_an_fsdp_checkpoint_resumes_under_fsdp_and_on_one_process(
    runs,
    tiny_source,
    tiny_data,  # noqa: F811 (the fixture imported above)
    tmp_path,
    run_cli,
):
    """The FSDP run cut back to its step-4 checkpoint, resumed (`resume: auto`) under FSDP and on one process."""
    source, _ = tiny_source("llama")
    fsdp = runs["fsdp"]
    again = truncated(fsdp, tmp_path / "fsdp", 4)
    trained("fsdp", fsdp_overrides(source, tiny_data, again))
    assert steps_logged(again) == list(range(1, 9))  # resumed at step 5, not started again
    assert losses(again) == losses(fsdp)  # same layout: exact
    a, b = final_weights(again), final_weights(fsdp)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in b)

    alone = truncated(fsdp, tmp_path / "one", 4)
    result = run_cli("train", TINY_RECIPE, *fsdp_overrides(source, tiny_data, alone))
    assert result.exit_code == 0, result.output
    assert steps_logged(alone) == list(range(1, 9))
    torch.testing.assert_close(torch.tensor(losses(alone)), torch.tensor(losses(fsdp)), rtol=RTOL, atol=0)
    assert_close_weights(final_weights(alone), final_weights(fsdp))


ALIGN = {"align.steps": 4, "log_every": 1, **DISTILL, "distill.hidden_weight": 0.5}


@pytest.mark.slow  # accelerate launches
def test_the_alignment_stage_under_ddp_and_fsdp(tiny_source, tiny_data, tmp_path, run_cli):  # noqa: F811
    """4 alignment steps (the token decoder without gradients, which DDP is told to expect), then 4 end-to-end
    steps with logit and hidden-state distillation: DDP and FSDP give the single-process run."""
    source, _ = tiny_source("llama")
    overrides = {name: tiny_overrides(source, tiny_data, tmp_path / name, **STEPS, **ALIGN)
                 for name in ("one", "ddp", "fsdp")}
    result = run_cli("train", TINY_RECIPE, *overrides["one"])
    assert result.exit_code == 0, result.output
    trained("ddp", overrides["ddp"])
    trained("fsdp", overrides["fsdp"])
    one = tmp_path / "one"
    assert len(log(one, "train/align_loss")) == 4 and len(log(one, "train/loss")) == 8
    for name in ("ddp", "fsdp"):
        out = tmp_path / name
        assert training(out)["distributed"]["processes"] == 2
        assert training(out)["distributed"]["type"] == {"ddp": "MULTI_CPU", "fsdp": "FSDP"}[name]
        for key in ("train/loss", "train/align_loss", "eval/val_loss"):
            torch.testing.assert_close(torch.tensor(log(out, key)), torch.tensor(log(one, key)), rtol=RTOL, atol=0)
        assert_close_weights(final_weights(out), final_weights(one))


def test_processes_without_a_process_group_are_refused(tiny_source, tiny_data, tmp_path, run_cli, monkeypatch):  # noqa: F811
    """What `accelerate launch --config_file recipes/accelerate/fsdp.yaml` gives on a machine without GPUs:
    each process is told it is one of 2 (WORLD_SIZE) but accelerate finds no device for the config's
    process group and runs it alone. Refused before any work, rather than 2 runs writing one folder."""
    source, _ = tiny_source("llama")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("train", TINY_RECIPE, *tiny_overrides(source, tiny_data, tmp_path / "out"))
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 2 processes were launched but accelerate joined none of them"), message
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
