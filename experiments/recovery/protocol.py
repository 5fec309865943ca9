"""The paper's uptraining claim at small scale, end to end: vanilla and Block Transformer from scratch for N
steps, then the vanilla model converted and uptrained for N/10 steps in several ways; every model scored on
the same held-out and out-of-domain windows. See docs/results.md for the numbers and the exact commands.

    python experiments/recovery/protocol.py WORK --corpus CORPUS_DIR_OR_ARCHIVE --tokenizer SPEC \
        [--stages data,vanilla,block-scratch,...] [--out DIR]

Stages run in order and are skipped when their result exists, so a chain can be split across commands (or
repeated after an interruption: a stopped training run resumes from its last checkpoint). `--out` gets a
copy of every small result after each stage (logs, scores), for machines whose disk is not kept.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the package, installed or not
RECIPES = REPO / "recipes" / "recovery"

# The vanilla model: Llama-shape, 512 wide, 8 layers, grouped-query attention, tied embeddings; with the
# SmolLM2 tokenizer (49,152 ids) 50.3M parameters, half of them the embedding table.
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1536, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True, hidden_act="silu")

# name -> (recipe, overrides). The uptrained runs start from the vanilla run's final model.
RUNS = {
    "vanilla": ("vanilla-scratch.yaml", {}),
    "block-scratch": ("block-scratch.yaml", {}),
    "uptrain-ce": ("uptrain.yaml", {}),
    "uptrain-distill": ("uptrain.yaml", {"distill.enabled": "true"}),
    "uptrain-new-parts-first": ("uptrain.yaml", {"new_parts_first": 12}),
    "uptrain-skip": ("uptrain.yaml", {"convert.method": "skip"}),
    "vanilla-continued": ("uptrain.yaml", {"architecture": "vanilla"}),  # the same N/10 steps for the source
}
STAGES = ["data", *RUNS, "score", "bench"]


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
    return [sys.executable, REPO / "cli.py", *args]


def stage_data(work: Path, corpus: Path, tokenizer: str) -> None:
    """The vanilla config folder (shape + tokenizer) and the token folder of the corpus's training sources."""
    from transformers import LlamaConfig

    from uptrain.sources import load_tokenizer, resolve

    config_dir = work / "vanilla-config"
    if not (config_dir / "config.json").is_file():
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
        run(uptrain("data", "prepare", text / "train", work / "tokens", "--tokenizer", config_dir,
                    "--val-fraction", "0.01", "--overwrite"), work / "logs" / "data.log")


def corpus_dir(work: Path, corpus: Path) -> Path:
    """The corpus folder (train/, ood/, corpus.json): `corpus` itself, or where the data stage unpacked it."""
    if corpus.is_dir():
        return corpus
    unpacked = sorted((work / "corpus").glob("*/corpus.json"))
    return unpacked[0].parent if unpacked else work / "corpus"


def stage_train(work: Path, name: str, extra: list[str]) -> None:
    recipe, overrides = RUNS[name]
    runs = work / "runs"
    if (runs / name / "final" / "config.json").is_file():
        return
    source = work / "vanilla-config" if "scratch" in recipe else runs / "vanilla" / "final"
    settings = {"source": source, "data": work / "tokens", "output_dir": runs / name, **overrides}
    run(uptrain("train", RECIPES / recipe, *[f"{k}={v}" for k, v in settings.items()], *extra),
        work / "logs" / f"{name}.log")


def models(work: Path) -> dict[str, Path]:
    """Every model to score: the trained ones and the fresh conversion (uptrain-ce's step 0)."""
    found = {name: work / "runs" / name / "final" for name in RUNS}
    found["fresh-conversion"] = work / "runs" / "uptrain-ce" / "converted"
    return {name: path for name, path in found.items() if (path / "config.json").is_file()}


def stage_score(work: Path, corpus: Path, device: str, count: int, seq_len: int) -> None:
    """Held-out (the validation split's first windows) and out-of-domain loss of every model, same windows."""
    from uptrain.data import TokenData
    from uptrain.evaluate import read_documents, score, text_windows
    from uptrain.inference import load_for_inference
    from uptrain.sources import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(str(work / "vanilla-config")))
    windows = {
        "heldout": list(TokenData(work / "tokens", "val").windows(seq_len, count)),
        "ood": text_windows(tokenizer, read_documents([str(corpus_dir(work, corpus) / "ood")]), seq_len, count),
    }
    scores = {}
    for name, path in models(work).items():
        model, _ = load_for_inference(str(path), device, "float32")
        scores[name] = {split: score(model, tokenizer, w, batch_size=16, label=f"{name} {split}") for split, w in windows.items()}
        print(name, {split: round(s["loss"], 4) for split, s in scores[name].items()}, flush=True)
    (work / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")


def stage_bench(work: Path) -> None:
    """Generation throughput of the uptrained block model against its vanilla source (same GPU, same call)."""
    out = work / "bench"
    if (out / "decode.json").is_file():
        return
    out.mkdir(exist_ok=True)
    run(uptrain("bench", work / "runs" / "uptrain-ce" / "final", "--baseline", work / "runs" / "vanilla" / "final",
                "--scenario", "custom", "--prompt-len", 128, "--gen-len", 512, "--batch-size", "256",
                "--repeats", 2, "--output", out / "decode.json"), work / "logs" / "bench.log")


def collect(work: Path, out: Path) -> None:
    """Small results into `out`: one archive of logs, scores and bench reports (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "recovery-results.tar.gz", "w:gz") as archive:
        for path in [*sorted((work / "runs").glob("*/train_log.jsonl")), *sorted((work / "runs").glob("*/final/training.json")),
                     *sorted((work / "logs").glob("*.log")), work / "scores.json", *sorted((work / "bench").glob("*"))]:
            if path.is_file():
                archive.add(path, arcname=str(path.relative_to(work)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="working folder (tokens, runs, scores)")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus folder or its .tar.xz archive (experiments/recovery/build_corpus.py)")
    parser.add_argument("--tokenizer", default="default", help="source spec whose tokenizer to use (SmolLM2's)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from: {', '.join(STAGES)}")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value for every training run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--score-windows", type=int, default=256, help="held-out and out-of-domain windows per model")
    parser.add_argument("--score-seq-len", type=int, default=1024, help="tokens per scored window")
    parser.add_argument("--out", type=Path, help="copy small results here after each stage")
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    for stage in STAGES:  # in protocol order, whatever order they were given in
        if stage not in stages:
            continue
        started = time.time()
        print(f"== {stage}", flush=True)
        if stage == "data":
            stage_data(work, args.corpus, args.tokenizer)
        elif stage == "score":
            stage_score(work, args.corpus, args.device, args.score_windows, args.score_seq_len)
        elif stage == "bench":
            stage_bench(work)
        else:
            stage_train(work, stage, args.set)
        print(f"== {stage} done in {time.time() - started:.0f} s", flush=True)
        if args.out:
            collect(work, args.out)


if __name__ == "__main__":
    main()
