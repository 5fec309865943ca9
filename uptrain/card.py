"""The model card (README.md) written next to every saved model."""

import json


def _front_matter(fields: dict) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def _training_section(training: dict | None) -> str:
    if not training:
        return ""
    lines = ["", "## Training", "", "| | |", "|---|---|"]
    lines.append(f"| optimizer steps | {training.get('steps')} |")
    lines.append(f"| tokens seen | {training.get('tokens'):,} |")
    if training.get("train_loss") is not None:
        lines.append(f"| last training loss | {training['train_loss']:.4f} |")
    evaluation = training.get("eval") or {}
    if evaluation:
        lines.append(f"| held-out loss | {evaluation['val_loss']:.4f} |")
        lines.append(f"| held-out perplexity | {evaluation['val_perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def model_card(config, record: dict, training: dict | None = None) -> str:
    """A card stating what the model is, how it was made (and trained) and how to load it."""
    fingerprint = record.get("source_fingerprint", {})
    fields = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if "hub_id" in fingerprint:
        fields["base_model"] = fingerprint["hub_id"]
    fields["tags"] = ["block-transformer", "block-uptrain", config.token_decoder.model_type]
    layers = config.source_layers
    options = record.get("options", {})
    body = f"""
# Block Transformer converted from `{record.get('source', 'unknown')}`

A [Block Transformer](https://arxiv.org/abs/2406.02657) (Ho et al., NeurIPS 2024) made by
[block-uptrain](https://pypi.org/project/block-uptrain/) {record.get('toolkit', {}).get('block-uptrain', '')}.
The lower layers of the source model became a *block decoder* that attends over blocks of
{config.block_length} tokens; the upper layers became a *token decoder* that only sees the current block
and {config.prefix_length} prefix vectors expanded from the block decoder's context. Its KV cache is about
{config.block_length}x smaller and mostly local, which is what makes generation fast.

| | |
|---|---|
| source architecture | `{config.token_decoder.model_type}` |
| block length | {config.block_length} |
| prefix vectors | {config.prefix_length} |
| layer method | {options.get('method', 'unknown')} |
| block decoder layers (source indices) | {layers.get('block_decoder')} |
| token decoder layers (source indices) | {layers.get('token_decoder')} |

A freshly converted model loses quality until it is uptrained (`uptrain train`).

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(model(**inputs).logits.shape)
```
"""
    return _front_matter(fields) + body + _training_section(training)
