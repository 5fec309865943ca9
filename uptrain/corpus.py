"""A small English corpus that needs nothing but Python itself: standard-library docstrings.

Machines that reach only package registries cannot download a dataset from the Hub; the docstrings of
well-documented standard-library modules are English prose about programming that every Python has.
Used by the tests and benchmarks (and a candidate default corpus for the quickstart).
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
