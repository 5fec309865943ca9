"""The `uptrain` command line: convert (and, as they land, train, generate, eval, bench, push)."""

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
    source: Annotated[str, typer.Argument(help="Local model folder, hub id, .gguf file, or 'default' (SmolLM2-135M-Instruct).")],
    out: Annotated[Path, typer.Argument(help="Output folder for the Block Transformer.")],
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside SOURCE (a folder or hub repo).")] = None,
    block_length: Annotated[int, typer.Option(help="Tokens per block (L_B).")] = 4,
    block_layers: Annotated[int | None, typer.Option(help="Source layers for the block decoder, 1..n (default: n // 2).")] = None,
    method: Annotated[str, typer.Option(help="How source layers go to the decoders: partition, skip or duplicate.")] = "partition",
    prefix_length: Annotated[int, typer.Option(help="Prefix vectors the context expands into (r).")] = 2,
    dtype: Annotated[str, typer.Option(help="Weight dtype of the output: auto (the source's), float32, bfloat16, float16.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists and is not empty.")] = False,
):
    """Convert a pretrained decoder-only model into a Block Transformer folder."""
    from uptrain.convert import ConvertOptions
    from uptrain.convert import convert as run_convert

    options = ConvertOptions(block_length, block_layers, method, prefix_length, dtype)
    path = run_convert(source, out, options, gguf_file=gguf_file, overwrite=overwrite)
    typer.echo(f"converted {source} -> {path}")


if __name__ == "__main__":
    app()
