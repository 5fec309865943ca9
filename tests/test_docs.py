"""The documentation holds together: every relative link in the README, the changelog and docs/ resolves to a
file inside the repository (and a #fragment to a heading of the page it names), and no page is too long to
read. Fast, no model."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_PAGE_BYTES = 15 * 1024
# The README is rewritten to its final, short form after the code it describes is merged; until then it is
# exempt from the size limit. Remove this exemption with that rewrite.
SIZE_EXEMPT = {"README.md"}

DOCS_PATH = re.compile(r"(?<![\w/.-])docs/\w[\w./-]*?\.md\b")  # docs/guides/train.md, as code and pages name them
# Notes outside the repository, which its readers do not have; spelt in two pieces so that this file passes too.
OUTSIDE = ("DESIGN" + ".md", "../" + "shared")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)  # fenced code blocks
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def tracked_files() -> list[Path]:
    """The repository's tracked text files (git's list; skipped outside a git checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = [ROOT / name for name in listed.decode().split("\0") if name]
    return [path for path in files if path.is_file() and not path.is_symlink() and b"\0" not in path.read_bytes()]


def pages() -> list[Path]:
    return sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])


def links(text: str) -> list[str]:
    """Link targets of a markdown text, code blocks and code spans left out."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a markdown text."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """'target: why' for each relative link of `page` that does not resolve to a file under `root`."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for target in links(text):
        if EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        path_part = path_part.split("?")[0]
        resolved = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not resolved.is_file():
            problems.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{fragment} in {resolved.name}")
    return problems


def test_the_pages_exist():
    names = {str(page.relative_to(ROOT)) for page in pages()}
    assert {"README.md", "CHANGELOG.md", "docs/concepts.md", "docs/results/README.md"} <= names


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_pages_are_short(page):
    if page.relative_to(ROOT).as_posix() in SIZE_EXEMPT:
        pytest.skip("the README is exempt until its rewrite")
    size = len(page.read_bytes())
    assert size <= MAX_PAGE_BYTES, f"{page.relative_to(ROOT)} is {size:,} bytes, above {MAX_PAGE_BYTES:,}"


def test_the_checker_finds_what_is_broken(tmp_path):
    """The link check against a hand-made tree: good links pass, each kind of bad one is reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section, with punctuation!\n")
    (tmp_path / "data.json").write_text("{}")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[fine](other.md) ![figure](../data.json) [anchored](other.md#a-section-with-punctuation)\n"
        "[web](https://example.com/x.md) [here](#title)\n"
        "# Title\n"
        "[missing](nothing.md) [outside](../../elsewhere.md) [bad anchor](other.md#no-such-heading)\n"
        "`[in code](nothing.md)`\n"
        "```\n[in a block](nothing.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "nothing.md: no such file",
        "../../elsewhere.md: outside the repository",
        "other.md#no-such-heading: no heading #no-such-heading in other.md",
    ]


def docs_paths(text: str) -> list[str]:
    """The `docs/....md` paths a text names (in prose, comments, code or links)."""
    return DOCS_PATH.findall(text)


def test_every_docs_path_named_in_code_and_pages_exists():
    missing = []
    for path in tracked_files():
        if path.suffix not in (".py", ".md"):
            continue
        text = path.read_text(encoding="utf-8")
        missing += [f"{path.relative_to(ROOT)}: {name}" for name in docs_paths(text) if not (ROOT / name).is_file()]
    assert missing == []


def test_no_tracked_file_points_outside_the_repository():
    found = []
    for path in tracked_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}: {name}" for name in OUTSIDE if name in text]
    assert found == []


def test_the_docs_path_finder():
    text = "see docs/guides/train.md, (docs/results/README.md#x) and `docs/concepts.md`; not mydocs/a.md or x/docs/b.md"
    assert docs_paths(text) == ["docs/guides/train.md", "docs/results/README.md", "docs/concepts.md"]
