"""docs/reference.md is what `python -m uptrain.reference` makes of the code today, and it names every option
that `uptrain COMMAND --help` shows and every recipe key. Fast, no model."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uptrain.cli import app
from uptrain.recipe import Recipe
from uptrain.reference import PAGE, REGENERATE, render

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    ("convert",),
    ("generate",),
    ("eval",),
    ("quickstart",),
    ("push",),
    ("bench",),
    ("serve",),
    ("train",),
    ("data", "prepare"),
    ("recipes",),
    ("recipes", "copy"),
]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])")  # --block-length, not --num of --num_processes


def test_the_reference_is_up_to_date():
    page = (ROOT / PAGE).read_text(encoding="utf-8")
    assert page == render(), f"docs/reference.md differs from the code: run `{REGENERATE}` in the checkout"


def section(page: str, command: tuple[str, ...]) -> str:
    """The part of the reference about one command: from its heading to the next."""
    start = page.index(f"\n### {' '.join(command)}\n")
    end = page.find("\n##", start + 1)
    return page[start:end]


def test_every_command_is_listed():
    shown = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}).output
    top_level = {command[0] for command in COMMANDS}
    for line in shown.splitlines():
        words = re.findall(r"[a-z]+", line)
        if words and words[0] in top_level:
            top_level.discard(words[0])
    assert not top_level, f"the reference's list of commands misses what `uptrain --help` shows: {top_level}"
    assert set(re.findall(r"^### ([a-z ]+)$", render(), re.M)) == {" ".join(command) for command in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_option_that_help_shows_is_in_the_reference(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    shown = set(OPTION.findall(result.output)) - {"--help"}
    documented = section(render(), command)
    # a flag's negative form (--no-overwrite) is its default: the reference names the flag and says "off"
    missing = {option for option in shown if f"`{option.replace('--no-', '--')}`" not in documented}
    assert missing == set()


def recipe_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for item in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[item.name]
        keys.append(prefix + item.name)
        if dataclasses.is_dataclass(kind):
            keys += recipe_keys(kind, f"{prefix}{item.name}.")
    return keys


def test_every_recipe_key_has_a_row_and_a_meaning():
    rows = {
        row.split("|")[1].strip(" `"): row.split("|")[4].strip()
        for row in render().splitlines()
        if row.startswith("| `")
    }
    for key in recipe_keys(Recipe):
        assert key in rows, f"recipe key {key} is missing from the reference"
        assert rows[key], f"recipe key {key} has no comment in uptrain/recipe.py to explain it"
