"""The `uptrain` command line: convert, generate, data prepare, train, recipes, eval, quickstart, push, bench,
serve."""

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from uptrain.errors import UserError

app = typer.Typer(
    help="Convert Hugging Face causal LMs into Block Transformers and uptrain them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main():
    """Convert Hugging Face causal LMs into Block Transformers and uptrain them."""


def reports_user_errors(command):
    """Turn a UserError into one line on stderr and exit code 1 (contract 6)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@reports_user_errors
def convert(
    source: Annotated[
        str, typer.Argument(help="Local model folder, hub id, .gguf file, or 'default' (SmolLM2-135M-Instruct).")
    ],
    out: Annotated[Path, typer.Argument(help="Output folder for the Block Transformer.")],
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside SOURCE (a folder or hub repo).")] = None,
    block_length: Annotated[int, typer.Option(help="Tokens per block (L_B).")] = 4,
    block_layers: Annotated[
        int | None, typer.Option(help="Source layers for the block decoder, 1..n (default: n // 2).")
    ] = None,
    method: Annotated[
        str, typer.Option(help="How source layers go to the decoders: partition, skip or duplicate.")
    ] = "partition",
    prefix_length: Annotated[int, typer.Option(help="Prefix vectors the context expands into (r).")] = 2,
    dtype: Annotated[
        str, typer.Option(help="Weight dtype of the output: auto (the source's), float32, bfloat16, float16.")
    ] = "auto",
    token_input_layers: Annotated[
        int | None,
        typer.Option(
            help="The token decoder also gets copies of the source's first N layers, before its own.",
            show_default="auto: min(2, the source layers below the token decoder's own), 0 if it has no own layers",
        ),
    ] = None,
    sink: Annotated[
        str,
        typer.Option(help="source: one more prefix slot holding the source's state of EOS at position 0; or none."),
    ] = "source",
    block_norm: Annotated[
        str,
        typer.Option(help="The block decoder's final norm: none (dropped), fresh (new, trained) or source (copied)."),
    ] = "none",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists and is not empty.")] = False,
):
    """Convert a pretrained decoder-only model into a Block Transformer folder."""
    from uptrain.convert import ConvertOptions
    from uptrain.convert import convert as run_convert

    options = ConvertOptions(
        block_length=block_length, block_layers=block_layers, method=method, prefix_length=prefix_length, dtype=dtype,
        token_input_layers=token_input_layers, sink=sink, block_norm=block_norm,
    )
    path = run_convert(source, out, options, gguf_file=gguf_file, overwrite=overwrite)
    typer.echo(f"converted {source} -> {path}")


@app.command()
@reports_user_errors
def generate(
    model: Annotated[str, typer.Argument(help="A converted folder, or any source convert accepts (to compare).")],
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts; several are generated as a batch.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Read prompts from a file, one a line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 means greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens; 0 means all.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 8,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside MODEL.")] = None,
):
    """Generate text; a single prompt is streamed to the terminal as it is produced."""
    import torch
    from transformers import TextStreamer

    from uptrain.inference import generate_texts, load_for_inference

    texts = list(prompts or [])
    if file is not None:
        if not file.is_file():
            raise UserError(f"prompt file not found: {file}")
        texts += [line for line in file.read_text().splitlines() if line.strip()]
    if not texts:
        raise UserError("give at least one prompt, or --file with one prompt a line")
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    torch.manual_seed(seed)
    loaded, tokenizer = load_for_inference(model, device, dtype, gguf_file)
    sampling = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens)
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p, top_k=top_k)
    stream = len(texts) == 1
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    for prompt, continuation in generate_texts(loaded, tokenizer, texts, batch_size, streamer, **sampling):
        if stream:
            continue  # already printed by the streamer
        typer.echo(f"### {prompt}\n{continuation}\n")


@app.command("eval")
@reports_user_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="A converted folder, or any source convert accepts.")],
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Corpus files, folders or globs (.txt, .jsonl, .json, .parquet), read as data prepare reads them; "
            "repeatable.",
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Zero-shot tasks, comma-separated: lambada, hellaswag, piqa, arc_easy, arc_challenge, winogrande, "
            "or all."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N items of each task.")] = None,
    baseline: Annotated[
        str | None, typer.Option(help="A model to score on the same windows and requests, e.g. the source.")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per scored window.")] = 256,
    max_windows: Annotated[int | None, typer.Option(help="Score at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows, or task requests, scored together.")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "float32",
):
    """Perplexity over text (--data) and zero-shot task accuracy (--tasks) of MODEL and --baseline.

    --data: loss, perplexity and bits per byte over the same token windows. --tasks: accuracy (and
    length-normalised accuracy, LAMBADA's perplexity) on the same requests, scored as lm-evaluation-harness
    scores them. For a converted folder the results are also saved in it (eval_results.json), for its model card.
    """
    from uptrain.architectures import is_block_folder
    from uptrain.data import tokenizer_fingerprint
    from uptrain.evaluate import format_table, read_documents, score, text_windows
    from uptrain.inference import load_for_inference
    from uptrain.records import update_evaluation, write_json
    from uptrain.sources import public_spec
    from uptrain.tasks import PACKAGE, parse_tasks, read_requests
    from uptrain.zero_shot import evaluate_tasks, format_task_table, task_records

    if not data and not tasks:
        raise UserError("give --data (perplexity over text), --tasks (zero-shot accuracy), or both")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    documents = read_documents(data) if data else None
    requests = {name: read_requests(name, limit) for name in parse_tasks(tasks)} if tasks else {}
    loaded, tokenizer = load_for_inference(model, device, dtype)
    results, task_results = {}, {}
    if documents is not None:
        windows = text_windows(tokenizer, documents, seq_len, max_windows)
        results["model"] = score(loaded, tokenizer, windows, batch_size, label=model)
    if requests:
        task_results["model"] = evaluate_tasks(loaded, tokenizer, requests, batch_size, label=model)
    if baseline is not None:
        other, other_tokenizer = load_for_inference(baseline, device, dtype)
        if documents is not None:
            if tokenizer_fingerprint(other_tokenizer) != tokenizer_fingerprint(tokenizer):
                raise UserError(f"{baseline} has another tokenizer than {model}: their losses are not comparable")
            results["baseline"] = score(other, other_tokenizer, windows, batch_size, label=baseline)
        if requests:
            task_results["baseline"] = evaluate_tasks(other, other_tokenizer, requests, batch_size, label=baseline)
    names = {"model": model, "baseline": baseline}
    if results:
        typer.echo(format_table({names[key]: value for key, value in results.items()}))
    if task_results:
        typer.echo(
            ("\n" if results else "") + format_task_table({names[key]: value for key, value in task_results.items()})
        )

    def report(name):  # name: how the models and data are named (`public_spec` in a published record)
        labels = {"model": "this model", "baseline": f"baseline: {name(baseline)}"}
        record = {}
        if results:
            record = {
                **results,
                "settings": {
                    "model": name(model),
                    "baseline": name(baseline),
                    "data": [name(d) for d in data],
                    "seq_len": seq_len,
                    "windows": len(windows),
                    "labels": labels,
                },
            }
        if task_results:
            settings = {
                "model": name(model),
                "baseline": name(baseline),
                "limit": limit,
                "data": PACKAGE,
                "labels": labels,
            }
            record["zero_shot"] = task_records(task_results, settings)
        return record

    if output is not None:
        write_json(output, report(lambda spec: spec))
    if is_block_folder(model):  # the card (`uptrain push`) shows the latest results; no local paths in it
        update_evaluation(Path(model), report(public_spec))


@app.command()
@reports_user_errors
def quickstart(
    out: Annotated[Path, typer.Argument(help="Folder for the corpus, data, run and summary.")] = Path("out/quickstart"),
    steps: Annotated[int | None, typer.Option(help="Uptraining steps (default: the tiny-cpu recipe's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists and is not empty.")] = False,
):
    """The whole job on the default model, offline: convert, uptrain, evaluate, sample, summarise."""
    from uptrain.quickstart import quickstart as run_quickstart

    run_quickstart(out, overwrite=overwrite, steps=steps)


@app.command()
@reports_user_errors
def push(
    model: Annotated[Path, typer.Argument(help="A converted or uptrained folder (or a quickstart output folder).")],
    repo_id: Annotated[
        str,
        typer.Argument(help="Hub repository, e.g. your-name/smollm2-135m-block4 (a bare name goes under your user)."),
    ],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    token: Annotated[
        str | None, typer.Option(help="Hub token with write access (default: HF_TOKEN or your stored login).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Branch to commit to (created when missing; default main).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Write the model card and list the files; upload nothing.")] = False,
):
    """Publish a model folder to the Hugging Face Hub with its model card (README.md).

    The card is rebuilt from the folder's records (conversion, training, eval results); a README.md
    that block-uptrain did not write is uploaded as it is.
    """
    from uptrain.publish import full_repo_id, model_folder, prepare
    from uptrain.publish import push as run_push

    folder = model_folder(model)  # before asking the Hub anything
    plan = prepare(folder, repo_id if dry_run else full_repo_id(repo_id, token))
    card = "wrote the model card" if plan.card_written else "kept the existing README.md (not written by block-uptrain)"
    total = sum(size for _, size in plan.files)
    typer.echo(f"{plan.folder}: {card}; {len(plan.files)} files, {total / 2**20:.1f} MiB")
    if dry_run:
        for name, size in plan.files:
            typer.echo(f"  {name}  ({size:,} bytes)")
        typer.echo(f"dry run: nothing uploaded to {repo_id}")
        return
    url = run_push(plan, token=token, private=private, revision=revision, commit_message=commit_message)
    typer.echo(f"pushed {len(plan.files)} files to {repo_id}: {url}")


@app.command()
@reports_user_errors
def bench(
    model: Annotated[str, typer.Argument(help="A converted folder, or any source convert accepts.")],
    baseline: Annotated[str | None, typer.Option(help="A model to measure the same way, e.g. the source.")] = None,
    scenario: Annotated[
        str, typer.Option(help="prefill-heavy (2048 -> 128 tokens), decode-heavy (128 -> 2048) or custom.")
    ] = "decode-heavy",
    prompt_len: Annotated[
        int | None, typer.Option(help="Prompt tokens (required for custom; overrides the scenario's).")
    ] = None,
    gen_len: Annotated[
        int | None, typer.Option(help="Generated tokens a row (required for custom; overrides the scenario's).")
    ] = None,
    batch_size: Annotated[
        str, typer.Option(help="A number, a list like 1,16,256, or auto: grow until memory runs short.")
    ] = "auto",
    random_init: Annotated[
        bool, typer.Option(help="Build the models from their configs (throughput does not depend on the weights).")
    ] = False,
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing each batch size.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size; the median is reported.")] = 3,
    max_batch_size: Annotated[int, typer.Option(help="Upper limit of the auto search.")] = 65536,
    device: Annotated[
        str, typer.Option(help="auto (cuda when there is a GPU, else cpu), cuda, cuda:1, cpu, ...")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    ] = "auto",
    output: Annotated[
        Path | None,
        typer.Option(help="JSON report path; the plot goes beside it as .png (default: bench-SCENARIO.json)."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="fast (static caches + CUDA graphs; on CPU without graphs), eager (no static caches or graphs: "
            "a block model's eager engine, transformers' generate for a vanilla model) or hf (model.generate as "
            "users call it)."
        ),
    ] = "fast",
    baseline_engine: Annotated[
        str | None, typer.Option(help="Engine of --baseline (default: --engine's); e.g. hf for transformers' generate.")
    ] = None,
    compile_steps: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="The fast engine's step functions through torch.compile before their capture (compiling takes "
            "minutes).",
        ),
    ] = False,
):
    """Generation throughput (tokens/s), time per token and peak memory of MODEL and --baseline.

    Random prompts, exactly --gen-len new tokens a row, greedy; warm-up, then the median of --repeats runs,
    timed with CUDA events on a GPU. With --engine fast both models run the same static-cache engine, so that
    the ratio measures the architecture.
    """
    import torch

    from uptrain.bench import BenchSettings, format_table, parse_batch_sizes, write_report
    from uptrain.bench import bench as run_bench

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    settings = BenchSettings(
        scenario=scenario,
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch_sizes=parse_batch_sizes(batch_size),
        warmup=warmup,
        repeats=repeats,
        device=device,
        dtype=dtype,
        random_init=random_init,
        max_batch_size=max_batch_size,
        engine=engine,
        baseline_engine=baseline_engine,
        compile=compile_steps,
    )
    output = output or Path(f"bench-{scenario}.json")
    report = run_bench(model, baseline, settings, on_result=lambda partial: write_report(partial, output, plot=False))
    figure = write_report(report, output)
    typer.echo(format_table(report))
    typer.echo(f"wrote {output}" + (f" and {figure}" if figure else " (install matplotlib for the plot)"))


@app.command()
@reports_user_errors
def serve(
    model: Annotated[
        str, typer.Argument(help="A converted or uptrained folder, or any source convert accepts (the baseline).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed at startup).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Requests generated together: the engine's rows.")] = 8,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for a row; past that a request gets 429.")
    ] = 64,
    max_context: Annotated[
        int | None,
        typer.Option(help="Tokens a request may hold, prompt and completion (default: the model's context length)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when there is a GPU, else cpu), cuda, cuda:1, cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), float32, bfloat16 or float16.")] = "auto",
    api_key: Annotated[
        str | None,
        typer.Option(envvar="UPTRAIN_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests."),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The name requests give as 'model' (default: MODEL as typed).")
    ] = None,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside MODEL.")] = None,
):
    """Serve MODEL over an OpenAI-compatible HTTP API, requests batched continuously on the fast engine.

    Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming with
    "stream": true). A new request joins the running batch at the next block (the next token for a plain
    model); greedy output equals the model's generate() on the prompt alone, and a sampled one with a "seed"
    is reproducible. SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, exit.
    """
    try:
        from uptrain.server import serve as run_server
    except ImportError as error:
        raise UserError(
            f"uptrain serve needs the serve extra ({error.name} is missing): pip install 'block-uptrain[serve]'"
        ) from None
    run_server(model, host, port, max_batch, max_queue, max_context, device, dtype, api_key, model_name, gguf_file)


data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
@reports_user_errors
def data_prepare(
    source: Annotated[str, typer.Argument(help="Text/jsonl/parquet file, folder, glob, or hub dataset id.")],
    out: Annotated[Path, typer.Argument(help="Output folder for token shards and manifest.json.")],
    tokenizer: Annotated[str, typer.Option(help="Model whose tokenizer to use (any SOURCE convert accepts).")],
    split: Annotated[str, typer.Option(help="Split of a hub dataset.")] = "train",
    text_field: Annotated[str, typer.Option(help="Field holding the text in jsonl/parquet/hub rows.")] = "text",
    name: Annotated[str | None, typer.Option(help="Configuration name of a hub dataset.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of documents held out for validation.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside --tokenizer's folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists and is not empty.")] = False,
):
    """Tokenize a corpus into shards for `uptrain train` (each document ends with EOS)."""
    from uptrain.architectures import is_block_folder
    from uptrain.data import prepare
    from uptrain.sources import load_tokenizer, resolve

    loaded = load_tokenizer(resolve(tokenizer, gguf_file), trust_remote_code=is_block_folder(tokenizer))
    if loaded is None:
        raise UserError(f"{tokenizer} has no tokenizer")
    manifest = prepare(
        source,
        out,
        loaded,
        split=split,
        text_field=text_field,
        name=name,
        val_fraction=val_fraction,
        seed=seed,
        overwrite=overwrite,
        tokenizer_name=tokenizer,
    )
    splits = manifest["splits"]
    summary = ", ".join(
        f"{key}: {value['tokens']:,} tokens in {value['documents']:,} documents" for key, value in splits.items()
    )
    typer.echo(f"wrote {out} ({summary})")


@app.command(context_settings={"ignore_unknown_options": True})
@reports_user_errors
def train(
    recipe: Annotated[str, typer.Argument(help="A YAML recipe file, or a shipped recipe's name (`uptrain recipes`).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides as dotted key=value, e.g. lr=1e-4 distill.enabled=true.")
    ] = None,
):
    """Uptrain a Block Transformer (converting the recipe's source first when needed).

    Runs on one process, or on many with `accelerate launch [--num_processes N] -m uptrain train RECIPE ...`.
    """
    from uptrain.recipe import load_recipe
    from uptrain.shipped_recipes import recipe_path
    from uptrain.train import train as run_training

    facts = run_training(load_recipe(recipe_path(recipe), overrides or []))
    evaluation = facts.get("eval") or {}
    held_out = f", held-out loss {evaluation['val_loss']:.4f}" if evaluation else ""
    typer.echo(
        f"trained {facts['steps']} steps ({facts['tokens']:,} tokens){held_out}; model in {facts['final_model']}"
    )


recipes_app = typer.Typer(help="The shipped recipes: list them, copy one to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes(context: typer.Context):
    """List the shipped training recipes and accelerate configurations, each with its description."""
    if context.invoked_subcommand is not None:
        return
    from uptrain.shipped_recipes import listing

    shipped = listing()
    width = max(len(name) for name, _ in shipped)
    for name, description in shipped:
        typer.echo(f"{name:<{width}}  {description}")


@recipes_app.command("copy")
@reports_user_errors
def recipes_copy(
    name: Annotated[str, typer.Argument(help="A shipped recipe (tiny-cpu, accelerate/ddp, ...).")],
    file: Annotated[Path, typer.Argument(help="The YAML file to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace FILE if it exists.")] = False,
):
    """Write a shipped recipe to FILE, to edit and run with `uptrain train FILE`."""
    from uptrain.shipped_recipes import copy

    typer.echo(f"wrote {copy(name, file, overwrite)}")
