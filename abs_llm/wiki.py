"""The embedded Wikipedia sample: articles of the enwiki dump excerpt inside the ``gensim`` wheel, as plain text.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (206 pages;
the 106 main-namespace pages that are not redirects are the articles). Each article's wikitext is parsed with
``mwparserfromhell`` and reduced to plain text: templates, ``<ref>``/table/gallery/math tags, comments, file, image
and category links, interlanguage links and bare external links are dropped, and so are the trailing reference
sections (References, External links, See also, Notes, ...); headings stay as text lines, paragraphs are separated by
blank lines, and link labels and bold/italic text keep their words. What the parser leaves as text in malformed
markup (unclosed tags, tables whose header holds templates) is removed by a last line-based pass, so no markup
remains. Articles shorter than 200 characters after cleaning are dropped.

Splits are by article and deterministic: articles sorted by page id, then every 10th article (positions 4, 14, 24,
...) is validation and every 10th (positions 9, 19, ...) is test; the rest is train.
"""

from __future__ import annotations

import bz2
import functools
import re
import xml.etree.ElementTree as ET

WIKI_RELPATH = ("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
MIN_CHARS = 200
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "chem", "timeline", "imagemap", "score", "hiero",
              "syntaxhighlight", "source", "graph", "mapframe", "templatedata", "noinclude", "includeonly"}
_DROP_LINK_NS = ("file:", "image:", "category:", "media:")
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
                  "citations", "footnotes", "notes and references", "works cited", "primary sources",
                  "secondary sources", "literature", "further reading and external links"}
_INTERLANG = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")
_LEFTOVER_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_LEFTOVER_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_LEFTOVER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_EMPHASIS = re.compile(r"'{2,}")


def _mw():
    try:
        import mwparserfromhell
    except ImportError as e:  # a declared dependency; a clear hint if an old environment lacks it
        raise ImportError("the Wikipedia corpus needs mwparserfromhell: `pip install mwparserfromhell`") from e
    return mwparserfromhell


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of one article's wikitext (see the module doc for what is kept and dropped)."""
    mw = _mw()
    code = mw.parse(wikitext)
    for section in code.get_sections(levels=[2]):
        headings = section.filter_headings(recursive=False)
        if headings and headings[0].title.strip_code().strip().lower() in _DROP_SECTIONS:
            _remove(code, section)
    for node in code.filter(recursive=True):
        if _dropped(node, mw.nodes):
            _remove(code, node)
    text = code.strip_code(normalize=True, collapse=True)
    return _tidy(text)


def _dropped(node, nodes) -> bool:
    if isinstance(node, (nodes.Template, nodes.Comment, nodes.Argument)):
        return True
    if isinstance(node, nodes.Tag):
        return str(node.tag).strip().lower() in _DROP_TAGS
    if isinstance(node, nodes.Wikilink):
        title = str(node.title).strip().lower()
        return title.startswith(_DROP_LINK_NS) or title.startswith(":" + _DROP_LINK_NS[2]) or bool(_INTERLANG.match(title))
    if isinstance(node, nodes.ExternalLink):
        return not node.title
    return False


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node
        pass


def _tidy(text: str) -> str:
    """Remove markup the parser left as text, and normalise blank lines."""
    for _ in range(3):  # nested leftovers peel one level per pass
        text = _LEFTOVER_TEMPLATE.sub("", _LEFTOVER_REF.sub("", text))
    text = _LEFTOVER_TAG.sub("", text)
    lines, in_table = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("{|"):
            in_table = True
        if in_table or s.startswith(("|", "!", "{{", "}}", "[[", "]]")):
            in_table = in_table and not s.startswith("|}")
            continue
        s = _EMPHASIS.sub("", s).replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
        s = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", s)  # a heading the parser did not recognise
        lines.append(s.lstrip("*#:; ").strip() if s[:1] in "*#:;" else s)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


PARSE_VERSION = 1  # bump when the cleaning changes: it invalidates the on-disk cache


def parse_dump(path) -> list[tuple[int, str, str]]:
    """``[(page id, title, plain text), ...]`` of the articles in the dump, sorted by page id (parses, ~40 s)."""
    out = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = {c.tag.rsplit("}", 1)[-1]: c for c in elem}
            revision = ns.get("revision")
            text = None if revision is None else next((c.text for c in revision if c.tag.endswith("}text")), None)
            if ns.get("ns") is not None and ns["ns"].text == "0" and "redirect" not in ns and text:
                plain = wikitext_to_text(text)
                if len(plain) >= MIN_CHARS:
                    out.append((int(ns["id"].text), ns["title"].text, plain))
            elem.clear()
    return sorted(out)


@functools.lru_cache(maxsize=2)
def _articles_cached(path: str, cache_dir: str | None) -> tuple[tuple[int, str, str], ...]:
    """Parsed once per machine: the result is kept as JSON under the abs_llm cache directory, keyed by the dump's
    SHA-256 and :data:`PARSE_VERSION` (written atomically; an unreadable cache is rebuilt)."""
    import hashlib
    import json
    import os
    import tempfile
    from pathlib import Path

    from .data import _umask, default_cache_dir

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    cache = default_cache_dir(cache_dir) / f"wiki-{digest[:16]}-v{PARSE_VERSION}.json"
    try:
        return tuple(tuple(a) for a in json.loads(cache.read_text(encoding="utf-8"))["articles"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    items = parse_dump(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"source_sha256": digest, "version": PARSE_VERSION, "articles": items}, f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the cache the user's usual permissions
        os.replace(tmp, cache)
    except OSError:  # a read-only cache directory only costs the parse next time
        pass
    return tuple(tuple(a) for a in items)


def articles(path, cache_dir=None) -> list[tuple[str, str]]:
    """``[(title, plain text), ...]`` of the articles in the dump at ``path``, sorted by page id."""
    return [(title, text) for _, title, text in _articles_cached(str(path), None if cache_dir is None else str(cache_dir))]


def split_articles(items: list, split: str) -> list:
    """The deterministic by-article split (see the module doc) of an id-sorted list."""
    pick = {"validation": lambda k: k % 10 == 4, "test": lambda k: k % 10 == 9,
            "train": lambda k: k % 10 not in (4, 9)}[split]
    return [a for k, a in enumerate(items) if pick(k)]
