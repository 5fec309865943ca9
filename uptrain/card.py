"""The model card (README.md) of a saved model: YAML metadata for the Hub, then what the model is, how it
was made, trained and evaluated, and how to load it. Built from the records in the folder, so that
`uptrain push` can rebuild it after `uptrain eval` added results."""

import json
from pathlib import Path

import yaml

from .records import read_records

# The first line of every card block-uptrain writes; a README.md without it was written by someone else and is kept.
MARKER = "<!-- model card written by block-uptrain; `uptrain push` rewrites it from the records beside it -->"


def card_for_folder(folder: Path, repo_id: str | None = None) -> str:
    config = json.loads((Path(folder) / "config.json").read_text())
    return model_card(config, **read_records(folder), repo_id=repo_id)


def is_our_card(text: str) -> bool:
    return MARKER in text


def model_card(
    config: dict,
    conversion: dict | None = None,
    training: dict | None = None,
    evaluation: dict | None = None,
    recipe: dict | None = None,
    repo_id: str | None = None,
) -> str:
    """The card for a Block Transformer with config `config` (a dict) and the given records."""
    conversion = conversion or {}
    model_type = config["token_decoder"]["model_type"]
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if conversion.get("base_model"):
        metadata["base_model"] = conversion["base_model"]
    if conversion.get("license"):
        metadata["license"] = conversion["license"]
    metadata["tags"] = ["block-transformer", "block-uptrain", model_type, "custom_code"]
    front = "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"
    sections = [
        _about(config, conversion),
        _conversion_table(config, conversion),
        _training_section(training, recipe),
        _evaluation_section(evaluation),
        _usage(repo_id or "PATH_OR_REPO_ID"),
    ]
    return front + MARKER + "\n" + "\n".join(section for section in sections if section)


def _about(config: dict, conversion: dict) -> str:
    source = conversion.get("base_model") or conversion.get("source", "an unknown source")
    version = conversion.get("toolkit", {}).get("block-uptrain", "")
    return f"""
# Block Transformer from `{source}`

A [Block Transformer](https://arxiv.org/abs/2406.02657) (Ho et al., NeurIPS 2024) made by
[block-uptrain](https://pypi.org/project/block-uptrain/) {version}. The lower layers of the source
model became a *block decoder* that attends over blocks of {config['block_length']} tokens; the upper
layers became a *token decoder* that sees only the current block and {config['prefix_length']} prefix
vectors expanded from the block decoder's context. Its KV cache is about {config['block_length']}x
smaller and mostly local, which is what makes generation fast.
"""


def _conversion_table(config: dict, conversion: dict) -> str:
    layers = config.get("source_layers", {})
    options = conversion.get("options", {})
    rows = [
        ("source", f"`{conversion.get('source', 'unknown')}`"),
        ("source architecture", f"`{config['token_decoder']['model_type']}`"),
        ("block length", config["block_length"]),
        ("prefix vectors", config["prefix_length"]),
        ("layer method", options.get("method", "unknown")),
        ("weights dtype", config.get("torch_dtype") or config.get("dtype") or options.get("dtype", "unknown")),
        ("block decoder layers (source indices)", layers.get("block_decoder")),
        ("token decoder layers (source indices)", layers.get("token_decoder")),
        *_option_rows(options, conversion.get("sink_token")),
        ("converted", conversion.get("created", "unknown")),
    ]
    return "## Conversion\n\n" + _table(rows)


def _option_rows(options: dict, sink_token: dict | None) -> list[tuple]:
    """Rows for the conversion options that keep more of the source's function, where they are on."""
    rows = []
    if options.get("token_input_layers"):
        rows.append(("token decoder input layers", f"copies of the source's first {options['token_input_layers']}"))
    if options.get("sink", "none") != "none":
        sink_token = sink_token or {}
        token = str(sink_token.get("text") or sink_token.get("id")).replace("|", "\\|")  # "|" would end the cell
        rows.append(("attention sink", f"prefix slot 0, the source's state of `{token}` at position 0"))
    if options.get("block_norm", "none") != "none":
        rows.append(("block decoder final norm", options["block_norm"]))
    return rows


def _training_section(training: dict | None, recipe: dict | None) -> str:
    if not training:
        return "## Training\n\nNot uptrained yet: a freshly converted model loses quality until `uptrain train` runs.\n"
    rows = [("optimizer steps", training.get("steps")), ("tokens seen", f"{training.get('tokens', 0):,}")]
    if recipe:
        distill = recipe.get("distill") or {}
        rows += [
            ("sequence length", recipe.get("seq_len")),
            ("sequences a step", recipe.get("global_batch_size")),
            ("peak learning rate", recipe.get("lr")),
            ("precision", recipe.get("precision")),
            ("distillation", _distillation(distill)),
        ]
        align = recipe.get("align") or {}
        if align.get("steps"):
            rows.append(("alignment stage", f"the first {align['steps']} steps: block decoder and new parts matched "
                                            f"to the source's states ({align.get('loss')}, peak learning rate "
                                            f"{align.get('lr')})"))
    if training.get("train_loss") is not None:
        rows.append(("last training loss", f"{training['train_loss']:.4f}"))
    held_out = training.get("eval") or {}
    if held_out:
        rows.append(("held-out loss", f"{held_out['val_loss']:.4f}"))
        rows.append(("held-out perplexity", f"{held_out['val_perplexity']:.2f}"))
    return "## Training\n\n" + _table(rows)


def _distillation(distill: dict) -> str:
    if not distill.get("enabled"):
        return "off"
    hidden = distill.get("hidden_weight")
    return f"weight {distill.get('weight')}" + (f", final hidden states weight {hidden}" if hidden else "")


def _evaluation_section(evaluation: dict | None) -> str:
    if not evaluation:
        return ""
    lines = ["## Evaluation", ""]
    if "model" in evaluation:
        lines += _perplexity_lines(evaluation)
    if evaluation.get("zero_shot"):
        lines += _zero_shot_lines(evaluation["zero_shot"])
    return "\n".join(lines).rstrip("\n") + "\n"


def _perplexity_lines(evaluation: dict) -> list[str]:
    settings = evaluation.get("settings", {})
    lines = []
    if settings:
        data = settings.get("data")
        data = ", ".join(map(str, data)) if isinstance(data, list) else data
        lines += [(f"Scored on {data}: {settings.get('windows')} windows of "
                   f"{settings.get('seq_len')} tokens, the same tokens for every row."), ""]
    lines += ["| | loss | perplexity | bits/byte |", "|---|---|---|---|"]
    labels = settings.get("labels", {})
    for key, result in evaluation.items():
        if isinstance(result, dict) and "loss" in result:
            name = labels.get(key, "this model" if key == "model" else key)
            figures = f"{result['loss']:.4f} | {result['perplexity']:.2f} | {result['bits_per_byte']:.4f}"
            lines.append(f"| {name} | {figures} |")
    return lines + [""]


# Zero-shot metrics in the order the card shows them: (key in the record, name, shown as a percentage)
ZERO_SHOT_METRICS = [("acc", "accuracy", True), ("acc_norm", "accuracy, length-normalised", True),
                     ("perplexity", "target-word perplexity", False)]


def _zero_shot_lines(tasks: dict) -> list[str]:
    baselines = sorted({str(task["settings"].get("baseline")) for task in tasks.values()
                        if "baseline" in task and task.get("settings")})
    sources = sorted({str(task.get("settings", {}).get("data")) for task in tasks.values()})
    lines = [(f"Zero-shot tasks (requests from {', '.join(f'`{source}`' for source in sources)}), scored as "
              "lm-evaluation-harness scores loglikelihood requests; ± one standard error."), ""]
    header = "| task | items | metric | this model |" + (" baseline |" if baselines else "")
    lines += [header, "|---|---|---|---|" + ("---|" if baselines else "")]
    for name, task in tasks.items():
        for key, metric, percent in ZERO_SHOT_METRICS:
            if key not in task.get("model", {}):
                continue
            row = f"| {name} | {task['model']['items']:,} | {metric} | {_metric(task['model'], key, percent)} |"
            if baselines:
                row += f" {_metric(task['baseline'], key, percent) if 'baseline' in task else ''} |"
            lines.append(row)
    if baselines:
        lines += ["", f"Baseline: {', '.join(f'`{name}`' for name in baselines)}."]
    return lines + [""]


def _metric(result: dict, key: str, percent: bool) -> str:
    if not percent:
        return f"{result[key]:,.2f}"
    error = result.get(f"{key}_stderr")
    return f"{100 * result[key]:.1f}" + (f" ± {100 * error:.1f}" if error is not None else "") + " %"


def _usage(repo: str) -> str:
    return f"""## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```

The model code ships in this repository (`trust_remote_code=True`); block-uptrain need not be installed.
"""


def _table(rows: list[tuple]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]) + "\n"
