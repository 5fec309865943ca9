"""Uptraining recovery measured end to end, in one of two setups (`--setup`):

- small (docs/reproducing-the-paper.md): vanilla and Block Transformer from scratch for N steps, then the vanilla model
  converted and uptrained for N/10 steps in several ways.
- smollm2: the real SmolLM2-135M-Instruct (`--source`, default the embedded GGUF) fine-tuned as it
  is (the fair ceiling) and converted and uptrained with the shipped recipe, with distillation, ...; the
  source and its fresh conversion are scored beside them.

Every model is scored on the same held-out and out-of-domain windows; `zero-shot` adds the six tasks,
`samples` greedy continuations of fixed prompts, `bench` generation throughput against the vanilla model.

    python experiments/recovery/protocol.py WORK --corpus CORPUS_DIR_OR_ARCHIVE [--setup small|smollm2]
        [--tokenizer SPEC] [--source SPEC] [--stages data,RUN,...,score] [--set key=value ...] [--out DIR]

Stages run in order and are skipped when their result exists, so a chain can be split across commands (or
repeated after an interruption: a stopped training run resumes from its last checkpoint), and two runs can
go to two GPUs at once (`CUDA_VISIBLE_DEVICES`, one `--stages RUN` each, the same WORK once `data` is done).
`--out` gets a copy of every small result after each stage (logs, scores), for machines whose disk is not kept.
"""

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = Path(__file__).resolve().parent / "recipes"
SMOLLM2_RECIPE = "smollm2-135m-b4"  # the shipped recipe, by name

# The vanilla model: Llama-shape, 512 wide, 8 layers, grouped-query attention, tied embeddings; with the
# SmolLM2 tokenizer (49,152 ids) 50.3M parameters, half of them the embedding table.
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1536, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True, hidden_act="silu")

# setup -> run name -> (recipe, overrides, start). start: "scratch" (random weights of WORK/vanilla-config's
# shape), "vanilla" (the small setup's pretrained vanilla run), "source" (--source, a real pretrained model).
SETUPS = {
    "small": {
        "vanilla": (RECIPES / "vanilla-scratch.yaml", {}, "scratch"),
        "block-scratch": (RECIPES / "block-scratch.yaml", {}, "scratch"),
        "uptrain-ce": (RECIPES / "uptrain.yaml", {}, "vanilla"),
        "uptrain-distill": (RECIPES / "uptrain.yaml", {"distill.enabled": "true"}, "vanilla"),
        "uptrain-skip": (RECIPES / "uptrain.yaml", {"convert.method": "skip"}, "vanilla"),
        "vanilla-continued": (RECIPES / "uptrain.yaml", {"architecture": "vanilla"}, "vanilla"),  # the same N/10 steps
    },
    # Budgets (max_steps, batch, warm-up) come from --set, the same for every run, so that the vanilla
    # fine-tune and the uptrained models see the same tokens. Kernel tuning is off: its minutes of
    # compilation outweigh its gain on runs of this length (`--set compile_tuning=true` turns it back on).
    "smollm2": {
        "vanilla-finetune": (SMOLLM2_RECIPE, {"architecture": "vanilla", "compile_tuning": "false"}, "source"),
        "uptrain-ce": (SMOLLM2_RECIPE, {"compile_tuning": "false"}, "source"),
        "uptrain-distill": (SMOLLM2_RECIPE, {"distill.enabled": "true", "compile_tuning": "false"}, "source"),
    },
}
# The vanilla model a setup's block models are measured against (bench's baseline, samples' reference).
VANILLA = {"small": "vanilla", "smollm2": "source"}
EXTRA_STAGES = ["score", "zero-shot", "samples", "bench"]
PROMPTS = ["The history of the Roman Empire", "Once upon a time, in a small village,",
           "def fibonacci(n):\n    ", "The capital of France is"]


def stages_of(setup: str) -> list[str]:
    return ["data", *SETUPS[setup], *EXTRA_STAGES]


def run(command: list, log: Path) -> None:
    """Run a command, its output teed into `log`; stop the protocol when it fails."""
    print("$", " ".join(map(str, command)), flush=True)
    with open(log, "a") as handle:
        process = subprocess.Popen([str(c) for c in command], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            handle.write(line)
            if "\r" not in line:
                sys.stdout.write(line)
        if process.wait():
            sys.exit(f"failed ({process.returncode}): {' '.join(map(str, command))}; log in {log}")


def uptrain(*args) -> list:
    return [sys.executable, "-m", "uptrain", *args]


def stage_data(work: Path, corpus: Path, tokenizer: str, setup: str) -> None:
    """The token folder of the corpus's training sources; for the small setup also the vanilla config folder
    (shape + tokenizer) that its from-scratch runs start from."""
    from transformers import LlamaConfig

    from uptrain.sources import load_tokenizer, resolve

    config_dir = work / "vanilla-config"
    if setup == "small" and not (config_dir / "config.json").is_file():
        loaded = load_tokenizer(resolve(tokenizer))
        config = LlamaConfig(**SHAPE, vocab_size=len(loaded), bos_token_id=loaded.bos_token_id,
                             eos_token_id=loaded.eos_token_id)
        config_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(config_dir)
        loaded.save_pretrained(config_dir)
    if corpus.is_file() and not (corpus_dir(work, corpus) / "corpus.json").is_file():  # the builder's archive
        (work / "corpus").mkdir(parents=True, exist_ok=True)
        with tarfile.open(corpus) as archive:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.10.12+, 3.11.4+
            archive.extractall(work / "corpus", **safe)
    text = corpus_dir(work, corpus)
    if not (work / "tokens" / "manifest.json").is_file():
        run(uptrain("data", "prepare", text / "train", work / "tokens", "--tokenizer",
                    config_dir if setup == "small" else tokenizer, "--val-fraction", "0.01", "--overwrite"),
            work / "logs" / "data.log")


def corpus_dir(work: Path, corpus: Path) -> Path:
    """The corpus folder (train/, ood/, corpus.json): `corpus` itself, or where the data stage unpacked it."""
    if corpus.is_dir():
        return corpus
    unpacked = sorted((work / "corpus").glob("*/corpus.json"))
    return unpacked[0].parent if unpacked else work / "corpus"


def tokenizer_spec(work: Path, setup: str, source: str) -> str:
    return str(work / "vanilla-config") if setup == "small" else source


def stage_train(work: Path, setup: str, name: str, source: str, extra: list[str]) -> None:
    recipe, overrides, start = SETUPS[setup][name]
    runs = work / "runs"
    if (runs / name / "final" / "config.json").is_file():
        return
    starts = {"scratch": work / "vanilla-config", "vanilla": runs / "vanilla" / "final", "source": source}
    settings = {"source": starts[start], "data": work / "tokens", "output_dir": runs / name, **overrides}
    run(uptrain("train", recipe, *[f"{k}={v}" for k, v in settings.items()], *extra), work / "logs" / f"{name}.log")


def models(work: Path, setup: str, source: str) -> dict[str, str]:
    """Every model to score: the source (smollm2), the trained ones, and the fresh conversion (uptrain-ce's
    step 0)."""
    found = {name: work / "runs" / name / "final" for name in SETUPS[setup]}
    found["fresh-conversion"] = work / "runs" / "uptrain-ce" / "converted"
    found = {name: str(path) for name, path in found.items() if (path / "config.json").is_file()}
    return {"source": source, **found} if setup == "smollm2" else found


def stage_score(work: Path, setup: str, source: str, corpus: Path, device: str, count: int, seq_len: int) -> None:
    """Held-out (the validation split's first windows) and out-of-domain loss of every model, same windows."""
    from uptrain.data import TokenData
    from uptrain.evaluate import read_documents, score, text_windows
    from uptrain.inference import load_for_inference
    from uptrain.sources import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(tokenizer_spec(work, setup, source)))
    windows = {
        "heldout": list(TokenData(work / "tokens", "val").windows(seq_len, count)),
        "ood": text_windows(tokenizer, read_documents([str(corpus_dir(work, corpus) / "ood")]), seq_len, count),
    }
    scores = {}
    for name, path in models(work, setup, source).items():
        model, _ = load_for_inference(path, device, "float32")
        scores[name] = {split: score(model, tokenizer, w, batch_size=16, label=f"{name} {split}")
                        for split, w in windows.items()}
        print(name, {split: round(s["loss"], 4) for split, s in scores[name].items()}, flush=True)
        del model
    (work / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")


def stage_zero_shot(work: Path, setup: str, source: str, device: str, limit: int | None) -> None:
    """The six zero-shot tasks for every model (`uptrain eval --tasks all`), one JSON each."""
    out = work / "zero-shot"
    out.mkdir(exist_ok=True)
    for name, path in models(work, setup, source).items():
        if not (out / f"{name}.json").is_file():
            run(uptrain("eval", path, "--tasks", "all", *(["--limit", limit] if limit else []), "--device", device,
                        "--batch-size", 32, "--output", out / f"{name}.json"), work / "logs" / "zero-shot.log")


def stage_samples(work: Path, setup: str, source: str, device: str, new_tokens: int = 48) -> None:
    """Greedy continuations of the same prompts from every model, float32."""
    from uptrain.inference import generate_texts, load_for_inference

    samples = {}
    for name, path in models(work, setup, source).items():
        model, tokenizer = load_for_inference(path, device, "float32")
        samples[name] = dict(generate_texts(model, tokenizer, PROMPTS, batch_size=len(PROMPTS),
                                            max_new_tokens=new_tokens, do_sample=False))
        del model
    (work / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")


def stage_bench(work: Path, setup: str, source: str) -> None:
    """Generation throughput of the uptrained block model against its vanilla model (same GPU, same process)."""
    out = work / "bench"
    if (out / "decode.json").is_file():
        return
    out.mkdir(exist_ok=True)
    vanilla = work / "runs" / "vanilla" / "final" if VANILLA[setup] == "vanilla" else source
    run(uptrain("bench", work / "runs" / "uptrain-ce" / "final", "--baseline", vanilla,
                "--scenario", "custom", "--prompt-len", 128, "--gen-len", 512, "--batch-size", "256",
                "--repeats", 2, "--output", out / "decode.json"), work / "logs" / "bench.log")


def collect(work: Path, out: Path) -> None:
    """Small results into `out`: one archive of logs, scores, tasks, samples and bench reports (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "recovery-results.tar.gz", "w:gz") as archive:
        for path in [*sorted((work / "runs").glob("*/train_log.jsonl")),
                     *sorted((work / "runs").glob("*/final/training.json")),
                     *sorted((work / "logs").glob("*.log")), work / "scores.json", work / "samples.json",
                     *sorted((work / "zero-shot").glob("*.json")), *sorted((work / "bench").glob("*"))]:
            if path.is_file():
                archive.add(path, arcname=str(path.relative_to(work)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="working folder (tokens, runs, scores)")
    parser.add_argument("--corpus", type=Path, required=True,
                        help="the corpus folder or its .tar.xz archive (experiments/recovery/build_corpus.py)")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="small")
    parser.add_argument("--source", default="default", help="smollm2: the pretrained model (any spec convert accepts)")
    parser.add_argument("--tokenizer", help="the data stage's tokenizer, any source spec (default: small, the default "
                        "model's; smollm2, the source's; a tokenizer folder lets data run before the source arrives)")
    parser.add_argument("--stages", help="comma-separated (default: all of the setup's): data, its runs, "
                        + ", ".join(EXTRA_STAGES))
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value for every training run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--score-windows", type=int, default=256, help="held-out and out-of-domain windows per model")
    parser.add_argument("--score-seq-len", type=int, default=1024, help="tokens per scored window")
    parser.add_argument("--task-limit", type=int, help="zero-shot: score the first N items of each task")
    parser.add_argument("--out", type=Path, help="copy small results here after each stage")
    args = parser.parse_args()
    known = stages_of(args.setup)
    stages = args.stages.split(",") if args.stages else known
    unknown = [s for s in stages if s not in known]
    if unknown:
        parser.error(f"unknown stages {unknown} for setup {args.setup}; choose from {known}")
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    source = args.source
    for stage in known:  # in protocol order, whatever order they were given in
        if stage not in stages:
            continue
        started = time.time()
        print(f"== {stage}", flush=True)
        if stage == "data":
            tokenizer = args.tokenizer or ("default" if args.setup == "small" else source)
            stage_data(work, args.corpus, tokenizer, args.setup)
        elif stage == "score":
            stage_score(work, args.setup, source, args.corpus, args.device, args.score_windows, args.score_seq_len)
        elif stage == "zero-shot":
            stage_zero_shot(work, args.setup, source, args.device, args.task_limit)
        elif stage == "samples":
            stage_samples(work, args.setup, source, args.device)
        elif stage == "bench":
            stage_bench(work, args.setup, source)
        else:
            stage_train(work, args.setup, stage, source, args.set)
        print(f"== {stage} done in {time.time() - started:.0f} s", flush=True)
        if args.out:
            collect(work, args.out)


if __name__ == "__main__":
    main()
