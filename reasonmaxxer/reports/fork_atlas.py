"""The fork atlas of a token-level analysis: the most frequent high-entropy "fork" contexts
(`fork_atlas`), written as fork_atlas.md and fork_atlas.html (templates/fork_atlas.html.j2) by
`write_fork_atlas`. Token text is shown with visible whitespace and escaped for each format."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from markupsafe import Markup

from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes
from .format import visible_whitespace
from .render import render
from .tables import Raw, Table
from .trajectories import SOURCE_TITLES, Analysis, flat, load_analysis, tok_text, vocab_of

NATS_TO_BITS = 1.4426950408889634


@dataclass(frozen=True)
class Fork:
    """One fork context: the `context` token texts before a high-entropy position and the base argmax there."""

    context: tuple[str, ...]
    base_token: str
    count: int  # high-entropy positions with this (context, base argmax)
    n_problems: int  # distinct trajectories they occur in
    n_reranked: int
    n_shifted: int
    tuned_tokens: tuple[tuple[str, int], ...]  # the tuned argmax where it differs, most common first
    prompt_context: int = 0  # how many leading context tokens are the end of the prompt

    @property
    def rate(self) -> float:
        """Fraction of these positions where the tuned model reranks (cls 1)."""
        return self.n_reranked / self.count

    @property
    def n_changed(self) -> int:
        return self.n_reranked + self.n_shifted


def fork_atlas(
    analysis: Analysis, *, context_tokens: int = 3, tau: float | None = None, source: str | None = None
) -> tuple[list[Fork], float]:
    """Group every position with base entropy > tau, along the `source` trajectories (default: the
    first source present), by (the `context_tokens` tokens before it, base argmax there); return
    (forks sorted by count desc, then rate desc, tau).

    The context reaches back into the stored end of the prompt (``prompt_tail_ids``), so a fork at
    the start of a completion shows what it answers; `Fork.prompt_context` counts those prompt
    tokens, and is part of the key (the same tokens inside the completion are another fork). Records
    without a prompt tail give shorter contexts there. tau defaults to the median base entropy at
    reranked positions. Keys use token ids, display uses text.
    """
    if context_tokens < 0:
        raise ReasonMaxxerError(f"fork atlas: context_tokens must be >= 0 (got {context_tokens})")
    recs = analysis.of(source or (analysis.sources[0] if analysis.records else "base"))
    if tau is None:
        ent, cls = flat(recs, "base_entropy"), flat(recs, "cls", int)
        rr = ent[(cls == 1) & ~np.isnan(ent)]
        if not rr.size:
            raise ReasonMaxxerError("fork atlas: no reranked positions to take the median entropy from; pass tau")
        tau = float(np.median(rr))
    vocab = vocab_of(analysis.records, analysis.token_text)
    groups: dict[tuple, list] = defaultdict(lambda: [0, set(), 0, 0, Counter()])
    for t, r in enumerate(recs):
        tail = [int(i) for i in r.get("prompt_tail_ids") or []]
        full = tail + [int(i) for i in r["token_ids"]]
        for j, (h, c) in enumerate(zip(r["base_entropy"], r["cls"])):
            if h is None or not float(h) > tau:
                continue
            at = len(tail) + j  # index of position j in `full`
            lo = max(0, at - context_tokens)
            key = (tuple(full[lo:at]), max(0, len(tail) - lo), int(r["base_argmax"][j]))
            g = groups[key]
            g[0] += 1
            g[1].add(t)
            g[2] += int(c) == 1
            g[3] += int(c) == 2
            if int(c) != 0:
                g[4][tok_text(vocab, r["tuned_argmax"][j])] += 1
    forks = [
        Fork(
            tuple(tok_text(vocab, i) for i in ctx),
            tok_text(vocab, b),
            g[0],
            len(g[1]),
            g[2],
            g[3],
            tuple(g[4].most_common()),
            n_prompt,
        )
        for (ctx, n_prompt, b), g in groups.items()
    ]
    forks.sort(key=lambda f: (-f.count, -f.rate, f.context, f.base_token))
    return forks, tau


def _md_code(text: str) -> str:
    """Visible-whitespace token text for a Markdown table cell (inline code, pipes escaped)."""
    s = visible_whitespace(text).replace("|", "\\|").replace("`", "ˋ")
    return f"`{s}`"


def _html_code(text: str) -> str:
    return str(Markup('<code class="t">{}</code>').format(visible_whitespace(text)))


def _context(f: Fork, code) -> str:
    """The fork's context as space-separated code pieces; ‖ marks where the prompt ends and the completion begins."""
    if not f.context:
        return "(start)"
    pre, post = f.context[: f.prompt_context], f.context[f.prompt_context :]
    return " ".join([code(t) for t in pre] + (["‖"] if pre else []) + [code(t) for t in post])


ATLAS_HEADER = ("#", "context", "base token", "count", "problems", "reranked", "shifted", "rate", "tuned instead")


def _atlas_tables(forks: list[Fork], top: int) -> list[tuple[str, list[Fork]]]:
    """(title, rows): the most frequent forks, and the forks where the tuned model changes the choice most."""
    changed = sorted((f for f in forks if f.n_changed), key=lambda f: (-f.n_changed, -f.count, f.context, f.base_token))
    return [
        (f"Most frequent forks (top {min(top, len(forks))} of {len(forks)} by count)", forks[:top]),
        (
            f"Where the tuned model changes the choice (top {min(top, len(changed))} of {len(changed)} forks "
            f"by reranked + shifted positions)",
            changed[:top],
        ),
    ]


def write_fork_atlas(out_dir, *, context_tokens: int = 3, top: int = 50, tau: float | None = None) -> Path:
    """Write out_dir/fork_atlas.html and out_dir/fork_atlas.md: per trajectory source, the `top` most
    frequent forks and the `top` forks where the tuned model changes most (see `fork_atlas`); return
    the HTML path. tau (default: the median base entropy at reranked positions of the first source)
    is the same for every source."""
    a = load_analysis(out_dir)
    forks_by, tau = {}, tau
    for source in a.sources or ["base"]:
        forks_by[source], tau = fork_atlas(a, context_tokens=context_tokens, tau=tau, source=source)
    title = f"Fork atlas: {a.config.get('tuned', 'tuned')} vs {a.config.get('base', 'base')}"
    intro = (
        f"Positions with base entropy > tau = {tau:.3g} nats ({tau * NATS_TO_BITS:.3g} bits), grouped by "
        f"(context, base token); context = the {context_tokens} tokens before the position, reaching back into "
        f"the end of the prompt (after ‖ the completion begins). rate = fraction of the fork's positions "
        f"where the tuned model reranks; tuned instead = the tuned argmax where it differs."
    )
    md = [f"# {title}", "", intro]
    sections = []  # (subtitle, [(table title, html Table)])
    for source, forks in forks_by.items():
        n_high = sum(f.count for f in forks)
        sub = f"{SOURCE_TITLES.get(source, source + ' trajectories')}: {n_high} high-entropy positions, {len(forks)} forks"
        md += ["", f"## {sub}"]
        tables = []
        for table_title, rows in _atlas_tables(forks, top):
            md += ["", f"### {table_title}", "", *_atlas_table(rows, _md_code).markdown()]
            tables.append((table_title, _atlas_table(rows, _html_code)))
        sections.append((sub, tables))
    atomic_write_bytes(Path(out_dir) / "fork_atlas.md", ("\n".join(md) + "\n").encode("utf-8"))
    path = Path(out_dir) / "fork_atlas.html"
    html = render("fork_atlas.html.j2", title=title, intro=intro, sections=sections)
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


def _atlas_table(rows: list[Fork], code) -> Table:
    """The forks as one table; `code` renders a token for the target format (Markdown or HTML)."""

    def tuned(f: Fork) -> str:
        return ", ".join(f"{code(t)}×{n}" for t, n in f.tuned_tokens[:3]) or "—"

    cells = [
        [str(i), Raw(_context(f, code)), Raw(code(f.base_token)), f.count, f.n_problems, f.n_reranked, f.n_shifted]
        + [f"{f.rate:.2f}", Raw(tuned(f))]
        for i, f in enumerate(rows, 1)
    ]
    return Table(ATLAS_HEADER, cells, classes=["r", "", "", "r", "r", "r", "r", "r", ""])
