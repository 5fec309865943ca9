"""Loading any model for inference (a converted Block Transformer or a plain source) and generating text."""

from collections.abc import Iterator

from .architectures import is_block_folder
from .errors import UserError
from .sources import DTYPES, load_model, load_tokenizer, resolve


def load_for_inference(spec: str, device: str = "cpu", dtype: str = "auto", gguf_file: str | None = None):
    """(model, tokenizer) for a converted folder or any source `convert` accepts."""
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    source = resolve(spec, gguf_file)
    if is_block_folder(spec):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=True, dtype=DTYPES.get(dtype, "auto"))
    else:
        model = load_model(source, dtype)
    tokenizer = load_tokenizer(source, trust_remote_code=is_block_folder(spec))
    if tokenizer is None:
        raise UserError(f"{spec} has no tokenizer")
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"cannot use device {device!r}: {str(error).splitlines()[0]}") from None
    return model, tokenizer


def generate_texts(
    model, tokenizer, prompts: list[str], batch_size: int, streamer=None, **settings
) -> Iterator[tuple[str, str]]:
    """Yield (prompt, continuation) in order, generating `batch_size` left-padded prompts at a time."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        output = model.generate(
            inputs.input_ids, attention_mask=inputs.attention_mask, pad_token_id=tokenizer.pad_token_id,
            streamer=streamer if len(chunk) == 1 else None, **settings,
        )
        width = inputs.input_ids.shape[1]
        for prompt, row in zip(chunk, output):
            yield prompt, tokenizer.decode(row[width:], skip_special_tokens=True)
