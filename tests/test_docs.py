"""The documentation holds together: every relative link in the README, the changelog and docs/ resolves to a
file inside the repository (and a #fragment to a heading of the page it names), and no page is too long to
read. Fast, no model."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_PAGE_BYTES = 15 * 1024
README_WORDS = 2500
QUICKSTART = "pip install torch==2.13.0 && pip install '.[gguf]' && uptrain quickstart out/quickstart"
TEST_COMMAND = "pip install torch==2.13.0 && pip install -e '.[test]' && ruff check . && python -m pytest -q"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")  # 655,339 or 28.8 or 1

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


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short():
    words = len(FENCE.sub("", readme()).split())
    assert words <= README_WORDS, f"README.md has {words} words outside code blocks, above {README_WORDS}"


def test_the_readme_opens_with_the_quickstart_and_the_test_command_ci_runs():
    blocks = [block.group(0).splitlines()[1:-1] for block in FENCE.finditer(readme())]
    assert blocks[:2] == [[QUICKSTART], [TEST_COMMAND]]
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == TEST_COMMAND


def results_rows(text: str, results: str = "docs/results/") -> list[tuple[str, list[str]]]:
    """(row without its links, results pages it links) of each row of the README's results table."""
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        targets = [target for target in LINK.findall(line) if target.startswith(results)]
        if line.startswith("|") and targets:
            rows.append((LINK.sub("", line), targets))
    return rows


def unsupported_numbers(text: str, root: Path = ROOT, results: str = "docs/results/") -> list[str]:
    """'number (pages)' for each number of a results row that none of the pages the row links to shows."""
    problems = []
    for row, targets in results_rows(text, results):
        pages = " ".join((root / target.split("#")[0]).read_text(encoding="utf-8") for target in targets)
        problems += [f"{number} ({', '.join(targets)})" for number in NUMBER.findall(row) if number not in pages]
    return problems


def test_every_number_of_the_readme_results_table_is_in_the_page_it_links():
    rows = results_rows(readme())
    assert len(rows) >= 4, "the README's results table is missing or has no row linking a results page"
    assert unsupported_numbers(readme()) == []


def test_the_results_check_finds_a_number_its_page_lacks(tmp_path):
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "speed.md").write_text("# Speed\n\n655,339 tokens/s, 8.4x\n")
    text = (
        "# x\n\n## Results\n\n| claim | figure | page |\n|---|---|---|\n"
        "| speed | 655,339 tokens/s, 8.4x, 9.9x | [speed.md](pages/speed.md) |\n\n## Next\n| 7 |\n"
    )
    assert unsupported_numbers(text, root=tmp_path, results="pages/") == ["9.9 (pages/speed.md)"]
