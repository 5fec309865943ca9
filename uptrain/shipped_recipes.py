"""The recipes that ship with the package: training recipes usable by name, and accelerate configurations.

They are package data (`uptrain/recipes/`, the checkout's top-level `recipes/` folder), so a wheel install
has them too. `uptrain recipes` lists them, `uptrain recipes copy NAME FILE` writes an editable copy, and
`uptrain train NAME` runs one as it ships. Names: a training recipe's file stem (`tiny-cpu`), an accelerate
configuration's as `accelerate/ddp`. A description is the file's first comment line.
"""

import os
from importlib.resources import files
from pathlib import Path

from .errors import UserError, first_line

ACCELERATE = "accelerate"  # the sub-folder of accelerate configurations (`accelerate launch --config_file`)


def _folder() -> Path:
    return Path(str(files("uptrain") / "recipes"))  # a plain folder: the package is installed unzipped


def _files() -> dict[str, Path]:
    """name -> file, training recipes first, each group by name."""
    recipes = sorted(_folder().glob("*.yaml"))
    configs = sorted((_folder() / ACCELERATE).glob("*.yaml"))
    return {**{path.stem: path for path in recipes}, **{f"{ACCELERATE}/{path.stem}": path for path in configs}}


def recipe_names() -> list[str]:
    """The training recipes, by name."""
    return [name for name in _files() if not name.startswith(f"{ACCELERATE}/")]


def listing() -> list[tuple[str, str]]:
    """(name, description) of every shipped file, training recipes first."""
    return [(name, description(path)) for name, path in _files().items()]


def description(path: Path) -> str:
    """The first comment line of a YAML file, without its `#`."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def recipe_path(spec: str) -> Path:
    """The recipe file `uptrain train SPEC` reads: SPEC itself when that path exists, else the shipped recipe of
    that name."""
    path = Path(spec)
    if path.exists():
        if not path.is_file():
            raise UserError(f"recipe {spec} is a folder, not a YAML file")
        return path
    if spec in recipe_names():
        return shipped_file(spec)
    raise UserError(f"no recipe file {spec}, and no shipped recipe of that name (shipped: {', '.join(recipe_names())})")


def shipped_file(name: str) -> Path:
    """The shipped file `name` (`tiny-cpu`, `accelerate/ddp`)."""
    shipped = _files()
    if name not in shipped:
        raise UserError(f"no shipped recipe {name!r}: choose from {', '.join(shipped)}")
    return shipped[name]


def copy(name: str, target: Path, overwrite: bool = False) -> Path:
    """Write shipped file `name` to `target` for editing; an existing file is replaced only with `overwrite`."""
    source = shipped_file(name)
    target = Path(target)
    if target.is_dir():
        raise UserError(f"{target} is a folder: give the file to write, e.g. {target / (Path(name).name + '.yaml')}")
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists: pass --overwrite to replace it")
    partial = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(source.read_text())
        os.replace(partial, target)
    except OSError as error:
        if partial.is_file():
            partial.unlink()
        raise UserError(f"cannot write {target}: {first_line(error)}") from None
    return target
