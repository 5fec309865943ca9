"""docs/reference.md: every command-line option and every recipe key, generated from the code.

    python -m uptrain.reference [FILE]      # in the checkout; default FILE: docs/reference.md

The commands come from the typer app (`uptrain.cli.app`): each command's usage, the first paragraph of its help
and a table of its arguments and options with what `--help` shows for them (name, default, help). The recipe keys
come from the recipe dataclasses (`uptrain.recipe`): key, type, default, and the comment written beside the field.
Read from the objects, not from a rendered terminal, the page is the same whatever the terminal's width or colours.
`tests/test_reference.py` fails when the page and the code differ.
"""

import dataclasses
import inspect
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

PAGE = Path("docs") / "reference.md"  # in the checkout
REGENERATE = "python -m uptrain.reference"

HEADER = f"""# Reference

Every option of the `uptrain` commands and every recipe key, generated from the code
(`{REGENERATE}`). The [guides](README.md) explain them in context.
"""


def cell(text) -> str:
    """A value as a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# -- commands ----------------------------------------------------------------------------------------------


def commands(group, path: tuple[str, ...] = ("uptrain",)):
    """(command path, click command) of every command under `group`, depth first, in registration order."""
    for name, command in group.commands.items():
        here = (*path, name)
        if command.callback is not None and not command.hidden:
            yield here, command
        if hasattr(command, "commands"):
            yield from commands(command, here)


def parameter_names(param) -> str:
    """`--name` of an option (a flag's `--no-name`, its default, left out), NAME of an argument."""
    return " ".join(f"`{name}`" for name in (param.opts if param.param_type_name == "option" else [param.name.upper()]))


def parameter_default(param) -> str:
    if param.required:
        return "required"
    default = param.default
    if param.param_type_name == "option" and getattr(param, "is_flag", False):
        return "on" if default else "off"
    if isinstance(getattr(param, "show_default", None), str):  # a default described in words
        return param.show_default
    if default is None or default == () or default == []:
        return ""
    return f"`{default}`"


def parameter_help(param) -> str:
    text = param.help or ""
    if getattr(param, "envvar", None):
        text += f" Also read from `{param.envvar}`."
    return text


def usage(command, path: tuple[str, ...]) -> str:
    pieces = ["[OPTIONS]" if any(p.param_type_name == "option" for p in command.params) else ""]
    for param in command.params:
        if param.param_type_name == "argument":
            name = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(name if param.required else f"[{name}]")
    return " ".join([*path, *[piece for piece in pieces if piece]])


def command_section(path: tuple[str, ...], command) -> str:
    summary = inspect.cleandoc(command.help or "").split("\n\n")[0]  # the first paragraph, as `uptrain --help`
    lines = [f"### {' '.join(path[1:])}", "", f"`{usage(command, path)}`: {' '.join(summary.split())}", ""]
    params = [p for p in command.params if not p.hidden]
    if params:
        lines += ["| name | default | meaning |", "|---|---|---|"]
        for param in params:
            lines.append(
                f"| {parameter_names(param)} | {cell(parameter_default(param))} | {cell(parameter_help(param))} |"
            )
        lines.append("")
    return "\n".join(lines)


def cli_reference() -> str:
    import typer.main

    from .cli import app

    root = typer.main.get_command(app)
    sections = ["## Commands", ""]
    sections += [command_section(path, command) for path, command in commands(root)]
    return "\n".join(sections)


# -- recipe keys -------------------------------------------------------------------------------------------

FIELD_LINE = re.compile(r"^    (\w+): ")  # a field of a dataclass body


def field_comments(cls) -> dict[str, str]:
    """{field name: the comment at the end of its line} of a dataclass, read from its source."""
    lines = inspect.getsource(cls).splitlines(keepends=True)
    comments = {}
    for token in tokenize.generate_tokens(iter(lines).__next__):
        field_line = FIELD_LINE.match(token.line)
        if token.type == tokenize.COMMENT and field_line:
            comments[field_line.group(1)] = token.string.lstrip("#").strip()
    return comments


def type_name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    return "null" if kind is type(None) else kind.__name__


def field_default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def key_table(cls, prefix: str = "") -> list[str]:
    """Table rows of a recipe dataclass's keys; a nested section is a row that points to its own table."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for item in dataclasses.fields(cls):
        kind, meaning = hints[item.name], cell(comments.get(item.name, ""))
        if dataclasses.is_dataclass(kind):
            rows.append(f"| `{prefix}{item.name}` | section | | {meaning} (below) |")
        else:
            rows.append(f"| `{prefix}{item.name}` | {type_name(kind)} | {field_default(item)} | {meaning} |")
    return rows


def recipe_reference() -> str:
    from .recipe import Recipe

    lines = [
        "## Recipe keys",
        "",
        "A recipe is a YAML file of these keys (`uptrain recipes copy tiny-cpu FILE` writes a complete one). "
        "An unknown key or a wrong type is a one-line error naming the key. `uptrain train RECIPE key=value "
        "...` overrides any of them, nested keys dotted (`distill.enabled=true`), each value read as YAML.",
        "",
        *key_table(Recipe),
    ]
    hints = typing.get_type_hints(Recipe)
    for item in dataclasses.fields(Recipe):
        section = hints[item.name]
        if dataclasses.is_dataclass(section):
            lines += [
                "",
                f"### The `{item.name}` section",
                "",
                inspect.cleandoc(section.__doc__ or ""),
                "",
                *key_table(section, prefix=f"{item.name}."),
            ]
    return "\n".join(lines) + "\n"


def render() -> str:
    return "\n".join([HEADER, cli_reference(), recipe_reference()]).rstrip("\n") + "\n"


def main(argv: list[str]) -> None:
    target = Path(argv[0]) if argv else PAGE
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
