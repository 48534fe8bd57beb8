"""The wikitext parser (abs_llm.wiki) and its by-article split; the corpus splits themselves are in test_data.py."""

from __future__ import annotations

import re

import pytest

import abs_llm
from abs_llm import wiki

ARTICLE = """{{Infobox country|name=Testland|capital=[[Capital City]]}}
'''Testland''' is a [[country]] in [[Europe|western Europe]].<ref name="a">{{cite web|url=http://x.org|title=X}}</ref>
It has ''two'' rivers.<ref>Plain ref text.</ref><!-- hidden comment -->

[[File:Flag.png|thumb|The flag of Testland]]
== History ==
Founded in 1900.{{citation needed|date=May 2020}} See [http://example.org the site] and [http://bare.example.org].

=== Early years ===
* First item
* Second item

{| class="wikitable"
! A !! B
|-
| 1 || 2
|}
<gallery>
Image:One.jpg|caption
</gallery>

== See also ==
* [[Other land]]

== References ==
{{reflist}}

[[Category:Countries]]
[[de:Testland]]
"""

EXPECTED = """Testland is a country in western Europe.
It has two rivers.

History
Founded in 1900. See the site and .

Early years
First item
Second item"""

MARKUP = re.compile(r"\{\{|\}\}|\[\[|\]\]|<ref|</|\{\||\|\}|'''|^=+[^=\n]+=+$|<!--", re.M)  # heading: == X ==


def test_wikitext_to_text_exact():
    assert wiki.wikitext_to_text(ARTICLE) == EXPECTED


def test_leftover_markup_is_removed():
    """Malformed markup the parser keeps as text (an unclosed template around a table, a stray ref) goes too."""
    broken = "Intro text here.\n{| class=x\n! {{Tooltip| SR | rate}} !! 1990\n|-\n| a || b\n|}\nAfter the table.<ref>x"
    text = wiki.wikitext_to_text(broken)
    assert "Intro text here." in text and "After the table." in text
    assert not MARKUP.search(text), text


def test_split_articles_is_a_deterministic_partition():
    items = list(range(57))
    parts = {s: wiki.split_articles(items, s) for s in ("train", "validation", "test")}
    assert sorted(sum(parts.values(), [])) == items
    assert parts["validation"] == [k for k in items if k % 10 == 4] and parts["test"] == [k for k in items if k % 10 == 9]
    assert wiki.split_articles(items, "test") == parts["test"]
