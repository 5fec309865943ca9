"""A small English corpus that needs nothing but Python itself: standard-library docstrings.

Machines that reach only package registries cannot download a dataset from the Hub; the docstrings of
well-documented standard-library modules are English prose about programming that every Python has.
The quickstart's corpus; the tests and benchmarks use it too.
"""

import importlib
import inspect
import json
from pathlib import Path

MODULES = ("json", "argparse", "collections", "pathlib", "textwrap", "logging", "random", "statistics",
           "datetime", "csv", "functools", "itertools", "subprocess", "unittest", "string", "shutil")


def docstrings(modules=MODULES, min_chars: int = 200) -> list[str]:
    """The distinct docstrings longer than `min_chars` of the modules and their public members, in order."""
    documents = []
    for name in modules:
        module = importlib.import_module(name)
        for _, member in [(name, module), *inspect.getmembers(module)]:
            doc = inspect.getdoc(member) if (inspect.ismodule(member) or callable(member)) else None
            if doc and len(doc) > min_chars and doc not in documents:
                documents.append(doc)
    return documents


def write_docstring_corpus(path: Path) -> Path:
    """The corpus as jsonl, one {"text": ...} document a line."""
    path.write_text("\n".join(json.dumps({"text": doc}) for doc in docstrings()) + "\n")
    return path


def source_docstrings(roots, min_chars: int = 200) -> list[str]:
    """The distinct docstrings longer than `min_chars` in the .py files under `roots` (test folders skipped),
    read with `ast` rather than imported: every installed package's documentation, without running it."""
    import ast

    documents = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            if {"test", "tests"} & set(path.parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > min_chars:
                        documents[doc] = None
    return list(documents)
