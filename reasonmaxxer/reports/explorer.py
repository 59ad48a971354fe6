"""Browse a token-level analysis (method.md section 2) as plots and self-contained HTML.

Reads what `analysis.run_analyze` wrote to ``out_dir`` (analysis.json, trajectories.jsonl) and
writes, next to it::

    out_dir/plots/entropy_reranked_vs_unshifted.png   base entropy at reranked vs unshifted positions
    out_dir/plots/rank_histogram.png                   base rank of the tuned argmax where they differ
    out_dir/plots/roc.png                              ROC of base entropy as a predictor of "reranked"
    out_dir/explorer.html                              every trajectory, token by token (one file)
    out_dir/fork_atlas.html, fork_atlas.md             the most frequent high-entropy "fork" contexts

The plots are per trajectory source: the names above are for the base model's trajectories,
``<name>_tuned.png`` for the tuned model's (`plot_names`); the explorer and the atlas have one
section per source. (The intervention plots, intervene_bars.png and tau_sweep.png, are written by
`intervene.run_intervene`.)

explorer.html is ONE file: inline CSS, the per-token data as JSON in a
``<script type="application/json">`` block and ~50 lines of vanilla JS that show a panel on hover
(and pin it on click): the position's numbers and the base and tuned top-5 with probabilities.
No fonts, no network references.

Limitations, honestly:
- No tokenizer is loaded: token text comes from analysis.json's ``token_text`` (every id the
  records refer to, written by `run_analyze`), else from the (id, text) pairs of the completions;
  an id found in neither shows as ``⟨id=1234⟩``.
- Analyses written before the top-5 were stored show the tuned argmax and its base rank only
  (the panel says so); before the prompt tail was stored, fork contexts stop at the completion start.

Token text is hostile: it is always HTML-escaped, the JSON block is escaped so it cannot close
its <script>, whitespace-only tokens are shown with visible markers. Plots use an explicit Agg
canvas (`plots.new_figure`); files are written atomically. The page is rendered by
templates/explorer.html.j2 (autoescaped; CSS and JS in templates/explorer.css and explorer.js).
The fork atlas is in `reports.fork_atlas` (`write_fork_atlas` is re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_bytes
from .fork_atlas import fork_atlas, write_fork_atlas
from .format import fmt_number, fmt_pct, visible_whitespace
from .plots import plot_entropy_by_class, plot_ranks, plot_roc, png_bytes, roc_curve
from .render import render
from .trajectories import SOURCE_TITLES, Analysis, flat, load_analysis, tok_text, vocab_of

__all__ = [
    "PLOT_NAMES",
    "TOP5_NOTE",
    "analysis_plots",
    "fork_atlas",
    "load_analysis",
    "plot_names",
    "roc_curve",
    "write_explorer",
    "write_fork_atlas",
]

PLOT_NAMES = ("entropy_reranked_vs_unshifted.png", "rank_histogram.png", "roc.png")


# base-entropy colour bins (nats): h0 < 0.1 <= h1 < 0.5 <= h2 < 1 <= h3 < 2 <= h4
ENTROPY_EDGES = (0.1, 0.5, 1.0, 2.0)


ENTROPY_COLOURS = ("transparent", "#fff3b0", "#ffd966", "#ffab40", "#ff6e6e")


def plot_names(source: str = "base") -> tuple[str, ...]:
    """File names of the three section-2 plots of one trajectory source (`PLOT_NAMES` for "base")."""
    return PLOT_NAMES if source == "base" else tuple(n.replace(".png", f"_{source}.png") for n in PLOT_NAMES)


def analysis_plots(out_dir) -> list[Path]:
    """Write the three section-2 plots of each trajectory source under out_dir/plots/ (see module
    docstring and `plot_names`); return their paths."""
    a = load_analysis(out_dir)
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in a.sources:
        recs = a.of(source)
        ent, cls = flat(recs, "base_entropy"), flat(recs, "cls", int)
        rank = flat(recs, "tuned_rank_in_base", int)
        figs = (
            plot_entropy_by_class(ent, cls, source),
            plot_ranks(rank[cls != 0], a.k, source),
            plot_roc(ent, cls, source),
        )
        for name, fig in zip(plot_names(source), figs):
            p = plots / name
            atomic_write_bytes(p, png_bytes(fig))
            paths.append(p)
    return paths


TOP5_NOTE = (
    "this analysis was written without the base and tuned top-5 (re-run `reasonmaxxer analyze` "
    "to store them); shown: the tuned argmax and its base rank."
)


def _entropy_bin(h: Any) -> int:
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return 0
    return int(np.searchsorted(ENTROPY_EDGES, float(h), side="right"))


def _rounded(xs: Sequence[Any], digits: int = 4) -> list:
    return [None if x is None else round(float(x), digits) for x in xs]


def _token_span(j: int, text: str, h: Any, c: int) -> dict[str, Any]:
    """One completion token for the template: its classes, shown text and the newlines after it
    (a whitespace-only token shows visible markers inside its span, its newlines after it)."""
    cls = f"tok h{_entropy_bin(h)}" + {1: " reranked", 2: " shifted"}.get(int(c), "")
    if text.strip():
        return {"cls": cls, "p": j, "text": text, "after": ""}
    return {"cls": cls, "p": j, "text": visible_whitespace(text), "after": "\n" * text.count("\n")}


def _prompt_tail(r: dict, vocab: dict[int, str]) -> str:
    """The stored end of the prompt as text ('…' + tokens), or '' when none was stored."""
    tail = r.get("prompt_tail_ids") or []
    return "…" + "".join(tok_text(vocab, i) for i in tail) if tail else ""


def _plot_pngs(out: Path, sources: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of the `analysis_plots` files that exist."""
    return [
        (n, (out / "plots" / n).read_bytes()) for s in sources for n in plot_names(s) if (out / "plots" / n).is_file()
    ]


def _na_number(x: Any) -> str:
    return fmt_number(x, 3, missing="n/a")


def _na_pct(x: Any) -> str:
    return fmt_pct(x, fraction=False, missing="n/a")


def _summary_rows(a: Analysis, shown: dict[str, int]) -> list[tuple[str, list[str]]]:
    """The header table: (metric, one value per trajectory source)."""
    metrics = [
        ("trajectories shown / total", lambda s, src: f"{shown[src]} / {len(a.of(src))}"),
        ("positions compared", lambda s, src: _na_number(s.get("n_positions"))),
        ("reranked", lambda s, src: _na_pct(s.get("reranked_pct"))),
        ("shifted", lambda s, src: _na_pct(s.get("shifted_pct"))),
        (
            "base entropy, reranked / unshifted (nats)",
            lambda s, src: f"{_na_number(s.get('entropy_reranked'))} / {_na_number(s.get('entropy_unshifted'))}",
        ),
        ("entropy ratio (reranked / unshifted)", lambda s, src: _na_number(s.get("entropy_ratio")) + "x"),
        ("AUROC of base entropy for reranked", lambda s, src: _na_number(s.get("auroc_entropy_reranked"))),
        ("mean base rank at changed positions", lambda s, src: _na_number(s.get("mean_tuned_rank_changed"))),
    ]
    return [(m, [fn(a.summary_of(src), src) for src in a.sources]) for m, fn in metrics]


def write_explorer(out_dir, *, max_trajectories: int = 200) -> Path:
    """Write out_dir/explorer.html: per trajectory source, the first `max_trajectories` completions,
    each token a ``<span class="tok hN [reranked|shifted]">`` coloured by base entropy (after the
    greyed end of the prompt, when stored); hover/click shows the position's numbers and the base
    and tuned top-5 with probabilities. A header carries the summary per source."""
    a = load_analysis(out_dir)
    vocab = vocab_of(a.records, a.token_text)
    cfg = a.config
    data = {"note": "note: " + TOP5_NOTE, "traj": [], "vocab": {}}
    needed: set[int] = set()
    sections = []  # per source: {title, trajectories: [{head, tail, spans}], hidden}
    shown: dict[str, int] = {}
    has_top = True
    for source in a.sources:
        recs = a.of(source)
        shown[source] = min(len(recs), max_trajectories)
        trajectories = []
        for r in recs[:max_trajectories]:
            t = len(data["traj"])
            item = _trajectory_data(r, t, source)
            if "bt" in item:
                needed.update(int(i) for k in ("base_top_ids", "tuned_top_ids") for row in r[k] for i in row)
            else:
                has_top = has_top and not item["cls"]
            data["traj"].append(item)
            needed.update(int(i) for k in ("token_ids", "base_argmax", "tuned_argmax") for i in r[k] if i is not None)
            needed.update(int(i) for i in r.get("prompt_tail_ids") or [])
            cls = item["cls"]
            head = (
                f"#{r.get('index', t)}"
                + (f" · {r['problem_id']}" if r.get("problem_id") is not None else "")
                + f" · {source} trajectory · {len(cls)} tokens · {r.get('finish_reason', '?')} · "
                f"{cls.count(1)} reranked, {cls.count(2)} shifted"
            )
            spans = [
                _token_span(j, str(x), h, c) for j, (x, h, c) in enumerate(zip(r["tokens"], r["base_entropy"], cls))
            ]
            trajectories.append({"t": t, "head": head, "tail": _prompt_tail(r, vocab), "spans": spans})
        sections.append(
            {
                "title": SOURCE_TITLES.get(source, source + " trajectories"),
                "source": source,
                "trajectories": trajectories,
                "hidden": len(recs) - shown[source],
            }
        )
    data["vocab"] = {str(i): vocab[i] for i in sorted(needed) if i in vocab}
    labels = (
        [f"H < {ENTROPY_EDGES[0]}"]
        + [f"{lo} ≤ H < {hi}" for lo, hi in pairwise(ENTROPY_EDGES)]
        + [f"H ≥ {ENTROPY_EDGES[-1]}"]
    )
    html = render(
        "explorer.html.j2",
        title=f"Token explorer: {cfg.get('tuned', 'tuned')} vs {cfg.get('base', 'base')}",
        problems=str(cfg.get("problems")),
        sources=a.sources,
        summary_rows=_summary_rows(a, shown),
        plots=_plot_pngs(Path(out_dir), a.sources),
        colours=ENTROPY_COLOURS,
        labels=labels,
        k=a.k,
        top5_note=None if has_top else TOP5_NOTE,
        sections=sections,
        max_trajectories=max_trajectories,
        data=data,
    )
    path = Path(out_dir) / "explorer.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


def _trajectory_data(r: dict, t: int, source: str) -> dict[str, Any]:
    """One trajectory's entry in the page's JSON data (what the hover panel shows)."""
    cls = [int(c) for c in r["cls"]]
    n = len(cls)
    item = {
        "index": r.get("index", t),
        "source": source,
        "ids": r["token_ids"],
        "H": _rounded(r["base_entropy"]),
        "ba": r["base_argmax"],
        "ta": r["tuned_argmax"],
        "rank": r["tuned_rank_in_base"],
        "cls": cls,
        "kl": _rounded(r.get("kl_base_tuned") or [None] * n),
        "rkl": _rounded(r.get("kl_tuned_base") or [None] * n),
        "js": _rounded(r.get("js") or [None] * n),
    }
    if all(len(r.get(k) or []) == n for k in ("base_top_ids", "base_top_p", "tuned_top_ids", "tuned_top_p")):
        item.update(bt=r["base_top_ids"], bp=r["base_top_p"], tt=r["tuned_top_ids"], tp=r["tuned_top_p"])
    return item
