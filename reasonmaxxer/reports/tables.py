"""One table writer for the reports: a (header, rows) `Table` rendered to Markdown lines
(`Table.markdown`) and to HTML (`Table.html_rows`, drawn by the ``table`` macro of
templates/macros.html.j2), plus the Markdown escaping both the tables and the text use.

A cell is plain text (escaped on output), a `Link` (a link only when its href has no URL scheme)
or `Raw` (markup already rendered for the target format, passed through unescaped).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape


@dataclass(frozen=True)
class Link:
    text: str
    href: str  # relative path; rendered as a link only if it has no URL scheme


class Raw(str):
    """A table cell that is already rendered markup (not to be escaped again)."""


_MD_ESCAPE = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_PUNCT = set("\\`*_[]|~$")


def md_escape(text: str) -> str:
    """Inline-safe Markdown for arbitrary text: HTML-special chars as entities, markup chars
    backslash-escaped. Newlines pass through (callers decide what a newline means)."""
    return "".join(_MD_ESCAPE.get(c) or ("\\" + c if c in _MD_PUNCT else c) for c in text)


def _is_punct(c: str) -> bool:
    return unicodedata.category(c)[0] in "PS"


def md_bold(core: str, prev: str) -> str:
    """**core** when CommonMark will read the ** as an opener (it will not after a letter when
    the text starts with punctuation, e.g. 'x' + '(') - then <b>core</b>."""
    if not prev or prev.isspace() or _is_punct(prev) or not _is_punct(core[0]):
        return f"**{core}**"
    return f"<b>{core}</b>"


def has_scheme(href: str) -> bool:
    """True for 'https://…', 'mailto:…'; False for relative paths and Windows drives ('C:')."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", href)
    return bool(m) and len(m.group(1)) > 1


def md_link(link: Link) -> str:
    if has_scheme(link.href):
        return md_escape(link.text)
    href = link.href.replace(" ", "%20").replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")
    return f"[{md_escape(link.text)}]({href})"


def md_cell(x: Any) -> str:
    if isinstance(x, Link):
        return md_link(x)
    if isinstance(x, Raw):
        return str(x).replace("\n", " ")
    return md_escape(str(x)).replace("\r", "").replace("\n", " ")


def html_cell(x: Any) -> Markup:
    """The inside of one <td>: escaped text, a link, or Raw markup as is."""
    if isinstance(x, Link):
        if has_scheme(x.href):
            return escape(x.text)
        return Markup('<a href="{}">{}</a>').format(x.href, x.text)
    if isinstance(x, Raw):
        return Markup(str(x))
    return escape(str(x))


@dataclass(frozen=True)
class Table:
    """header [C], rows [R][C]; align: one 'l'/'r' per column (Markdown separators, and the HTML
    class 'r' unless `classes` gives each column's class)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    align: str = ""
    classes: Sequence[str] | None = None

    def markdown(self) -> list[str]:
        align = self.align or "l" * len(self.header)
        sep = ["---:" if a == "r" else "---" for a in align]
        lines = ["| " + " | ".join(md_cell(h) for h in self.header) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in self.rows]
        return lines

    def html_rows(self) -> list[list[tuple[str, Markup]]]:
        """[R][C] (class, cell markup) for the ``table`` template macro."""
        cls = list(self.classes) if self.classes else ["r" if a == "r" else "" for a in self.align]
        return [[(cls[i] if i < len(cls) else "", html_cell(c)) for i, c in enumerate(r)] for r in self.rows]
