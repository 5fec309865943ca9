"""Resolving and loading a source model: a local folder, a hub id, or a GGUF file."""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    """Where a model comes from: `location` is a local folder or a hub id; `gguf_file` a file inside it."""

    spec: str
    location: str
    gguf_file: str | None = None
    is_local: bool = True

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def public_name(self) -> str:
        """How records and model cards name the source: a hub id as it is, a local source by its folder or
        GGUF file name only, so that publishing a model never publishes a path of the machine it was made on."""
        if not self.is_local:
            return self.location
        return self.gguf_file or Path(self.location).resolve().name


def resolve(spec: str, gguf_file: str | None = None) -> Source:
    """Turn what the user typed into a Source, or fail with a clear message."""
    if spec == "default" and not Path(spec).exists():
        from .default_model import default_model_path

        path = default_model_path()
        return Source(spec, str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(
                f"source {spec} is a file but not a .gguf file; give a model folder, a hub id or a .gguf file"
            )
        return Source(spec, str(path.parent), path.name)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise UserError(f"no GGUF file {gguf_file} in {spec}")
            return Source(spec, str(path), gguf_file)
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} has no config.json: not a Hugging Face model folder")
        return Source(spec, str(path))
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_local or not HUB_ID.match(spec):
        raise UserError(f"source not found: {spec}")
    return Source(spec, spec, gguf_file, is_local=False)


def public_spec(spec: str | None) -> str | None:
    """`spec` as a published record may show it: a local path cut to its last component (a file or folder
    name); hub ids, keywords (`default`, `auto`, `none`) and anything not on this machine stay as they are."""
    if spec is None or spec in ("default", "auto", "none"):
        return spec
    path = Path(spec).expanduser()
    return path.resolve().name if path.is_absolute() or path.exists() else spec


def require_gguf(source: Source) -> None:
    if not source.gguf_file:
        return
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install 'block-uptrain[gguf]'") from None


def load_config(source: Source):
    from transformers import AutoConfig

    require_gguf(source)
    try:
        return AutoConfig.from_pretrained(source.location, **source.kwargs)
    except Exception as error:  # any failure to read the source is the user's to fix
        raise UserError(f"cannot read the config of {source.spec}: {first_line(error)}") from None


def load_model(source: Source, dtype: str = "auto"):
    """The source as a transformers causal LM on the CPU, in `dtype` (auto: the checkpoint's own)."""
    from transformers import AutoModelForCausalLM

    require_gguf(source)
    torch_dtype = DTYPES.get(dtype, "auto")
    if dtype == "auto" and source.gguf_file:
        torch_dtype = torch.float32  # GGUF weights are dequantized
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype, **source.kwargs)
    except Exception as error:  # corrupt or truncated weights, unreachable hub, ...
        raise UserError(f"cannot load the weights of {source.spec}: {first_line(error)}") from None
    if source.gguf_file:  # the weights are dequantized: from here on it is a plain float model
        model.hf_quantizer = None
        dequantized(model.config)
    return model


def dequantized(config):
    """`config` without its `quantization_config`, for a model of plain float weights: a GGUF source's
    weights are dequantized on loading, and random weights are floats. transformers refuses `save_pretrained`
    while the key is there."""
    config.__dict__.pop("quantization_config", None)
    return config


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    """The source's tokenizer, or None when it has none. Our own folders need `trust_remote_code`, since
    their config maps to the shipped model code. A GGUF file's special tokens are taken from its header."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **source.kwargs)
    except Exception:
        return None
    if source.gguf_file and source.is_local:
        set_special_tokens(tokenizer, gguf_special_token_ids(Path(source.location) / source.gguf_file))
    return tokenizer


# GGUF header keys of the special-token ids, by the tokenizer attribute they set.
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """{"eos_token": id, ...} as the GGUF file's header states them.

    transformers' GGUF tokenizer reading differs between versions (5.17 gives SmolLM2's EOS as id 1, 5.24
    as id 2, the header's), and a token folder prepared under one would be refused under the other."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {name: int(fields[key].contents()) for name, key in GGUF_SPECIAL_TOKENS.items() if key in fields}


def set_special_tokens(tokenizer, ids: dict[str, int]) -> None:
    for name, token_id in ids.items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))


def fingerprint(source: Source) -> dict:
    """What identifies the exact source: its name and file hashes for local files (no path), the commit for
    hub models."""
    if not source.is_local:
        from huggingface_hub import try_to_load_from_cache

        config_path = try_to_load_from_cache(source.location, "config.json")
        revision = Path(config_path).parent.name if isinstance(config_path, str) else None
        return {"hub_id": source.location, "revision": revision}
    folder = Path(source.location)
    names = [source.gguf_file] if source.gguf_file else sorted(
        p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()
    )
    return {"name": source.public_name, "sha256": {name: _sha256(folder / name) for name in names}}


def card_metadata(source: Source) -> dict:
    """What the Hub card of a conversion should carry over from its source: `base_model` (a hub id,
    when known) and `license` (when the source states one). Best effort: missing facts are left out."""
    from .default_model import DEFAULT_HUB_ID, is_default_gguf

    found = {}
    if not source.is_local:
        found["base_model"] = source.location
    elif source.gguf_file and is_default_gguf(Path(source.location) / source.gguf_file):
        found["base_model"] = DEFAULT_HUB_ID
    try:
        if source.gguf_file and source.is_local:
            found["license"] = _gguf_license(Path(source.location) / source.gguf_file)
        elif source.is_local:
            found["license"] = _front_matter(Path(source.location) / "README.md").get("license")
        else:
            from huggingface_hub import ModelCard

            found["license"] = ModelCard.load(source.location).data.license
    except Exception:  # no card, unreadable metadata, hub unreachable: the card simply has no license
        pass
    return {key: value for key, value in found.items() if value}


def _gguf_license(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    return field.contents() if field is not None else None


def _front_matter(readme: Path) -> dict:
    import yaml

    text = readme.read_text() if readme.is_file() else ""
    if not text.startswith("---"):
        return {}
    return yaml.safe_load(text.split("---", 2)[1]) or {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
