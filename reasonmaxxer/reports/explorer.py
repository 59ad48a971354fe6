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
canvas (`report.new_figure`); files are written atomically.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape as _h
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ..core.stats import roc_curve
from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, read_jsonl
from .run_report import BASE_CSS, fmt_number, new_figure, png_bytes, visible_whitespace

PLOT_NAMES = ("entropy_reranked_vs_unshifted.png", "rank_histogram.png", "roc.png")


REQUIRED_KEYS = ("tokens", "token_ids", "base_entropy", "base_argmax", "tuned_argmax", "tuned_rank_in_base", "cls")


# base-entropy colour bins (nats): h0 < 0.1 <= h1 < 0.5 <= h2 < 1 <= h3 < 2 <= h4
ENTROPY_EDGES = (0.1, 0.5, 1.0, 2.0)


ENTROPY_COLOURS = ("transparent", "#fff3b0", "#ffd966", "#ffab40", "#ff6e6e")


NATS_TO_BITS = 1.4426950408889634


@dataclass(frozen=True)
class Analysis:
    """analysis.json (config, summaries per trajectory source, token_text) and the trajectories.jsonl
    records of one out_dir. A record without "source" is a base trajectory."""

    config: dict
    summary: dict
    records: list[dict]
    summaries: dict = field(default_factory=dict)
    token_text: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.summary.get("k") or self.config.get("k") or 5)

    @property
    def sources(self) -> list[str]:
        """Trajectory sources present, in file order ("base", "tuned")."""
        return list(dict.fromkeys(_source(r) for r in self.records))

    def of(self, source: str) -> list[dict]:
        """The records of one trajectory source."""
        return [r for r in self.records if _source(r) == source]

    def summary_of(self, source: str) -> dict:
        return self.summaries.get(source) or (self.summary if source == self.sources[0] else {})


def _source(r: dict) -> str:
    return str(r.get("source") or "base")


def load_analysis(out_dir) -> Analysis:
    """Read and check out_dir/analysis.json and out_dir/trajectories.jsonl."""
    out = Path(out_dir)
    jp, tp = out / "analysis.json", out / "trajectories.jsonl"
    for p in (jp, tp):
        if not p.is_file():
            raise ReasonMaxxerError(f"explorer: {p} not found; run `reasonmaxxer analyze ... --out {out}` first")
    try:
        meta = json.loads(jp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReasonMaxxerError(f"explorer: {jp}: not valid JSON ({e})") from None
    records = []
    for ln, r in read_jsonl(tp, allow_empty=True):  # ln: "path:line"
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ReasonMaxxerError(f"explorer: {ln}: missing field(s) {', '.join(missing)}")
        n = len(r["tokens"])
        bad = [k for k in REQUIRED_KEYS if len(r[k]) != n]
        if bad:
            raise ReasonMaxxerError(f"explorer: {ln}: field(s) {', '.join(bad)} do not have one entry per token ({n})")
        records.append(r)
    return Analysis(
        meta.get("config") or {},
        meta.get("summary") or {},
        records,
        meta.get("summaries") or {},
        meta.get("token_text") or {},
    )


def _flat(records: Sequence[dict], key: str, dtype=float) -> np.ndarray:
    """One per-position field over all trajectories, concatenated: [N]. None (nan in JSON) -> nan / -1."""
    fill = math.nan if dtype is float else -1
    return np.array([fill if v is None else v for r in records for v in r[key]], dtype=dtype)


def _vocab(records: Sequence[dict], token_text: dict | None = None) -> dict[int, str]:
    """token id -> text: analysis.json's token_text, then the (id, text) pairs of the completions."""
    out: dict[int, str] = {int(i): str(t) for i, t in (token_text or {}).items()}
    for r in records:
        for i, t in zip(r["token_ids"], r["tokens"]):
            out.setdefault(int(i), str(t))
    return out


def _tok_text(vocab: dict[int, str], i: Any) -> str:
    return vocab[int(i)] if i is not None and int(i) in vocab else f"⟨id={i}⟩"


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
        ent, cls = _flat(recs, "base_entropy"), _flat(recs, "cls", int)
        rank = _flat(recs, "tuned_rank_in_base", int)
        figs = (_plot_entropy(ent, cls, source), _plot_ranks(rank[cls != 0], a.k, source), _plot_roc(ent, cls, source))
        for name, fig in zip(plot_names(source), figs):
            p = plots / name
            atomic_write_bytes(p, png_bytes(fig))
            paths.append(p)
    return paths


def _plot_entropy(ent: np.ndarray, cls: np.ndarray, source: str = "base"):
    fig = new_figure(7, 3.8)
    ax = fig.add_subplot()
    ok = ~np.isnan(ent)
    hi = max(float(ent[ok].max()) if ok.any() else 1.0, 1e-6) * 1.02
    edges = np.linspace(0.0, hi, 61)
    for c, label, colour in ((0, "unshifted", "#4878a8"), (1, "reranked", "#e07b00")):
        v = ent[ok & (cls == c)]
        if v.size:
            ax.hist(
                v,
                bins=edges,
                log=True,
                alpha=0.6,
                color=colour,
                label=f"{label} ({v.size:,}; mean {v.mean():.3g} nats)",
            )
    ax.set_xlabel("base-model entropy of the next-token distribution (nats)")
    ax.set_ylabel("positions (log scale)")
    ax.set_title(f"Base entropy at reranked vs unshifted positions ({source} trajectories)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    return fig


def _plot_ranks(rank: np.ndarray, k: int, source: str = "base"):
    labels = [str(r) for r in range(1, k + 1)] + [f">{k}"]
    counts = [int((rank == r).sum()) for r in range(1, k + 1)] + [int((rank > k).sum())]
    fig = new_figure(6, 3.6)
    ax = fig.add_subplot()
    bars = ax.bar(labels, counts, color=["#4878a8"] * k + ["#c0392b"])
    ax.bar_label(bars, labels=[str(c) for c in counts])
    ax.set_xlabel("base rank of the tuned model's argmax (1 = base argmax)")
    ax.set_ylabel("changed positions")
    ax.set_title(f"Base rank of the tuned argmax\n({rank.size:,} changed positions, {source} trajectories)")
    return fig


def _plot_roc(ent: np.ndarray, cls: np.ndarray, source: str = "base"):
    fpr, tpr, auc = roc_curve(ent, cls == 1)
    fig = new_figure(4.8, 4.6)
    ax = fig.add_subplot()
    ax.plot(
        fpr, tpr, color="#e07b00", label=f"base entropy (AUROC = {fmt_number(auc, 3) if math.isfinite(auc) else 'n/a'})"
    )
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="chance (0.5)")
    ax.set_xlabel("false positive rate (non-reranked positions)")
    ax.set_ylabel("true positive rate (reranked positions)")
    ax.set_title(f"Base entropy as a predictor of 'reranked'\n({source} trajectories)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    return fig


def _entropy_bin(h: Any) -> int:
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return 0
    return int(np.searchsorted(ENTROPY_EDGES, float(h), side="right"))


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):.2f}%"


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt_number(x, digits)


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: '<', '>' and '&' as \\u escapes (cannot close the element)."""
    return (
        json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


_EXPLORER_CSS = (
    """
pre.traj{white-space:pre-wrap;overflow-wrap:anywhere;background:#fafafa;border:1px solid #ddd;padding:.8em;
font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.7}
span.tok{cursor:pointer;border-radius:2px}
span.tok:hover,span.tok.sel{outline:2px solid #333}
span.ctx{color:#999}
"""
    + "".join(f"span.h{i}{{background:{c}}}\n" for i, c in enumerate(ENTROPY_COLOURS))
    + """
span.reranked{box-shadow:inset 0 -3px 0 #1f6fd1;font-weight:600}
span.shifted{box-shadow:inset 0 -3px 0 #c0392b;border:1px dashed #c0392b;font-weight:600}
span.key{display:inline-block;padding:0 .5em;margin-right:.3em;border:1px solid #ccc;font-family:ui-monospace,monospace}
#panel{position:fixed;right:1em;bottom:1em;width:36em;background:#fff;border:1px solid #888;border-radius:4px;
padding:.6em .8em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
box-shadow:0 2px 8px rgba(0,0,0,.25)}
#panel:empty{display:none}
"""
)


# Reads the JSON block, then shows one position's numbers and both top-5 lists on hover; a click
# pins the panel (a second click on the same token unpins). Sets body[data-ready] = "1" when wired up.
_EXPLORER_JS = """
(function(){
var D=JSON.parse(document.getElementById('data').textContent), P=document.getElementById('panel'), pinned=null;
var CLS=['unshifted','reranked','shifted'];
function vis(s){return s===''?'\\u2205':s.replace(/ /g,'\\u2423').replace(/\\n/g,'\\u21b5').replace(/\\t/g,'\\u21e5').replace(/\\r/g,'\\u240d');}
function tx(i){return i===null?'?':(Object.prototype.hasOwnProperty.call(D.vocab,i)?vis(D.vocab[i]):'\\u27e8id='+i+'\\u27e9');}
function f(x,d){return x===null?'n/a':Number(x).toPrecision(d||3);}
function pad(s,n){s=String(s); if(s.length>n)s=s.slice(0,n-1)+'\\u2026'; while(s.length<n)s+=' '; return s;}
function top(ids,ps,emitted){return ids.map(function(i,r){
  return (i===emitted?'*':' ')+(r+1)+' '+pad(tx(i),12)+' '+Number(ps[r]).toFixed(3);});}
function show(el){
  var t=D.traj[+el.dataset.t], j=+el.dataset.p, h=t.H[j];
  var L=[t.source+' trajectory #'+t.index+', position '+j+': '+CLS[t.cls[j]],
    'token             '+tx(t.ids[j]),
    'base entropy      '+f(h)+' nats'+(h===null?'':' ('+f(h*1.4427)+' bits)'),
    'base argmax       '+tx(t.ba[j]),
    'tuned argmax      '+tx(t.ta[j])+'   (base rank '+t.rank[j]+')',
    'KL(base||tuned)   '+f(t.kl[j])+' nats', 'KL(tuned||base)   '+f(t.rkl[j])+' nats', 'JS                '+f(t.js[j])+' nats'];
  if(t.bt&&t.bt[j]&&t.tt&&t.tt[j]){
    var b=top(t.bt[j],t.bp[j],t.ids[j]), u=top(t.tt[j],t.tp[j],t.ids[j]);
    L.push('', pad('base top-'+b.length+' (p)',24)+'tuned top-'+u.length+' (p)');
    for(var r=0;r<Math.max(b.length,u.length);r++)L.push(pad(b[r]||'',24)+(u[r]||''));
    L.push('* = the token emitted here');
  } else L.push(D.note);
  P.textContent=L.join('\\n');
}
document.addEventListener('mouseover',function(e){var el=e.target.closest('span.tok'); if(el&&pinned===null)show(el);});
document.addEventListener('click',function(e){
  var el=e.target.closest('span.tok'); if(!el)return;
  if(pinned)pinned.classList.remove('sel');
  if(pinned===el){pinned=null;return;}
  pinned=el; el.classList.add('sel'); show(el);
});
document.body.dataset.ready='1';
})();
"""


TOP5_NOTE = (
    "this analysis was written without the base and tuned top-5 (re-run `reasonmaxxer analyze` "
    "to store them); shown: the tuned argmax and its base rank."
)


SOURCE_TITLES = {
    "base": "Along the base model's greedy trajectories",
    "tuned": "Along the tuned model's greedy trajectories",
}


def _token_span(t: int, j: int, text: str, h: Any, c: int) -> str:
    cls = f"tok h{_entropy_bin(h)}" + {1: " reranked", 2: " shifted"}.get(int(c), "")
    if text.strip():
        return f'<span class="{cls}" data-t="{t}" data-p="{j}">{_h(text, quote=False)}</span>'
    # whitespace-only: visible markers inside the span, the newlines themselves after it
    span = f'<span class="{cls}" data-t="{t}" data-p="{j}">{_h(visible_whitespace(text), quote=False)}</span>'
    return span + "\n" * text.count("\n")


def _prompt_tail_html(r: dict, vocab: dict[int, str]) -> str:
    """The stored end of the prompt, greyed (not a token span), or nothing."""
    tail = r.get("prompt_tail_ids") or []
    if not tail:
        return ""
    text = "…" + "".join(_tok_text(vocab, i) for i in tail)
    return f'<span class="ctx" title="end of the prompt">{_h(text, quote=False)}</span>'


def _plots_html(out: Path, sources: Sequence[str]) -> str:
    """The `analysis_plots` PNGs that exist, inlined as data: URIs (none: a note)."""
    imgs = [
        f'<img alt="{_h(n)}" style="max-width:32%" src="data:image/png;base64,'
        f'{base64.b64encode((out / "plots" / n).read_bytes()).decode("ascii")}">'
        for s in sources
        for n in plot_names(s)
        if (out / "plots" / n).is_file()
    ]
    return f"<p>{''.join(imgs)}</p>" if imgs else '<p class="note">No plots yet (run analysis_plots first).</p>'


def _rounded(xs: Sequence[Any], digits: int = 4) -> list:
    return [None if x is None else round(float(x), digits) for x in xs]


def _summary_table(a: Analysis, shown: dict[str, int]) -> str:
    """The header table: one column per trajectory source."""
    metrics = [
        ("trajectories shown / total", lambda s, src: f"{shown[src]} / {len(a.of(src))}"),
        ("positions compared", lambda s, src: _num(s.get("n_positions"))),
        ("reranked", lambda s, src: _pct(s.get("reranked_pct"))),
        ("shifted", lambda s, src: _pct(s.get("shifted_pct"))),
        (
            "base entropy, reranked / unshifted (nats)",
            lambda s, src: f"{_num(s.get('entropy_reranked'))} / {_num(s.get('entropy_unshifted'))}",
        ),
        ("entropy ratio (reranked / unshifted)", lambda s, src: _num(s.get("entropy_ratio")) + "x"),
        ("AUROC of base entropy for reranked", lambda s, src: _num(s.get("auroc_entropy_reranked"))),
        ("mean base rank at changed positions", lambda s, src: _num(s.get("mean_tuned_rank_changed"))),
    ]
    head = "<tr><th></th>" + "".join(f"<th>{_h(src)} trajectories</th>" for src in a.sources) + "</tr>"
    rows = "".join(
        f"<tr><th>{_h(m)}</th>" + "".join(f"<td>{_h(fn(a.summary_of(src), src))}</td>" for src in a.sources) + "</tr>"
        for m, fn in metrics
    )
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def write_explorer(out_dir, *, max_trajectories: int = 200) -> Path:
    """Write out_dir/explorer.html: per trajectory source, the first `max_trajectories` completions,
    each token a ``<span class="tok hN [reranked|shifted]">`` coloured by base entropy (after the
    greyed end of the prompt, when stored); hover/click shows the position's numbers and the base
    and tuned top-5 with probabilities. A header carries the summary per source."""
    a = load_analysis(out_dir)
    vocab = _vocab(a.records, a.token_text)
    cfg = a.config
    title = f"Token explorer: {cfg.get('tuned', 'tuned')} vs {cfg.get('base', 'base')}"
    data = {"note": "note: " + TOP5_NOTE, "traj": [], "vocab": {}}
    needed: set[int] = set()
    body: list[str] = []
    shown: dict[str, int] = {}
    has_top = True
    for source in a.sources:
        recs = a.of(source)
        shown[source] = min(len(recs), max_trajectories)
        body.append(f"<h2>{_h(SOURCE_TITLES.get(source, source + ' trajectories'))}</h2>")
        for r in recs[:max_trajectories]:
            t = len(data["traj"])
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
                needed.update(int(i) for k in ("base_top_ids", "tuned_top_ids") for row in r[k] for i in row)
            else:
                has_top = has_top and n == 0
            data["traj"].append(item)
            needed.update(int(i) for k in ("token_ids", "base_argmax", "tuned_argmax") for i in r[k] if i is not None)
            needed.update(int(i) for i in r.get("prompt_tail_ids") or [])
            spans = "".join(
                _token_span(t, j, str(x), h, c) for j, (x, h, c) in enumerate(zip(r["tokens"], r["base_entropy"], cls))
            )
            head = (
                f"#{r.get('index', t)}"
                + (f" · {r['problem_id']}" if r.get("problem_id") is not None else "")
                + f" · {source} trajectory · {n} tokens · {r.get('finish_reason', '?')} · "
                f"{cls.count(1)} reranked, {cls.count(2)} shifted"
            )
            body.append(
                f'<div class="trajectory"><h3>{_h(head)}</h3>'
                f'<pre class="traj">{_prompt_tail_html(r, vocab)}{spans}</pre></div>'
            )
        if len(recs) > max_trajectories:
            body.append(
                f'<p class="note">{len(recs) - max_trajectories} more {_h(source)} trajectories not shown '
                f"(max_trajectories={max_trajectories}).</p>"
            )
    data["vocab"] = {str(i): vocab[i] for i in sorted(needed) if i in vocab}

    labels = (
        [f"H < {ENTROPY_EDGES[0]}"]
        + [f"{lo} ≤ H < {hi}" for lo, hi in pairwise(ENTROPY_EDGES)]
        + [f"H ≥ {ENTROPY_EDGES[-1]}"]
    )
    legend = (
        "<p>Base entropy (nats): "
        + "".join(f'<span class="key h{i}">{_h(l)}</span>' for i, l in enumerate(labels))
        + ' — <span class="key reranked">reranked</span> tuned argmax in base top-'
        + f'{a.k} <span class="key shifted">shifted</span> outside it. '
        + "␣ ↵ ⇥ mark whitespace-only tokens; grey text is the end of the prompt. "
        + "Hover a token for its numbers and both models' top-5; click to pin.</p>"
    )
    note = "" if has_top else f'<p class="note">{_h(TOP5_NOTE)}</p>'
    html = (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{_h(title)}</title><style>{BASE_CSS}{_EXPLORER_CSS}</style></head><body>",
                f"<h1>{_h(title)}</h1>",
                (
                    f"<p>Problems <code>{_h(str(cfg.get('problems')))}</code>, greedy decoding; both models are teacher-forced "
                    f"on the same prefixes, and each completion token is coloured by the base entropy of the distribution "
                    f"that preceded it.</p>"
                ),
                _summary_table(a, shown),
                _plots_html(Path(out_dir), a.sources),
                legend,
                note,
                *body,
                '<div id="panel"></div>',
                f'<script type="application/json" id="data">{_script_json(data)}</script>',
                f"<script>{_EXPLORER_JS}</script>",
                "<footer>Generated by reasonmaxxer.explorer. Self-contained: no external resources.</footer>",
                "</body></html>",
            ]
        )
        + "\n"
    )
    path = Path(out_dir) / "explorer.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


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
        ent, cls = _flat(recs, "base_entropy"), _flat(recs, "cls", int)
        rr = ent[(cls == 1) & ~np.isnan(ent)]
        if not rr.size:
            raise ReasonMaxxerError("fork atlas: no reranked positions to take the median entropy from; pass tau")
        tau = float(np.median(rr))
    vocab = _vocab(analysis.records, analysis.token_text)
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
                g[4][_tok_text(vocab, r["tuned_argmax"][j])] += 1
    forks = [
        Fork(
            tuple(_tok_text(vocab, i) for i in ctx),
            _tok_text(vocab, b),
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
    return f'<code class="t">{_h(visible_whitespace(text), quote=False)}</code>'


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
    name = f"{a.config.get('tuned', 'tuned')} vs {a.config.get('base', 'base')}"
    intro = (
        f"Positions with base entropy > tau = {tau:.3g} nats ({tau * NATS_TO_BITS:.3g} bits), grouped by "
        f"(context, base token); context = the {context_tokens} tokens before the position, reaching back into "
        f"the end of the prompt (after ‖ the completion begins). rate = fraction of the fork's positions "
        f"where the tuned model reranks; tuned instead = the tuned argmax where it differs."
    )

    def tuned(f: Fork, code) -> str:
        return ", ".join(f"{code(t)}×{n}" for t, n in f.tuned_tokens[:3]) or "—"

    md = [f"# Fork atlas: {name}", "", intro]
    html_parts = [f"<p>{_h(intro)}</p>"]
    for source, forks in forks_by.items():
        n_high = sum(f.count for f in forks)
        sub = f"{SOURCE_TITLES.get(source, source + ' trajectories')}: {n_high} high-entropy positions, {len(forks)} forks"
        md += ["", f"## {sub}"]
        html_parts.append(f"<h2>{_h(sub)}</h2>")
        for title, rows in _atlas_tables(forks, top):
            md += ["", f"### {title}", "", "| " + " | ".join(ATLAS_HEADER) + " |", "|" + "---|" * len(ATLAS_HEADER)]
            md += [
                f"| {i} | {_context(f, _md_code)} | {_md_code(f.base_token)} | {f.count} "
                f"| {f.n_problems} | {f.n_reranked} | {f.n_shifted} | {f.rate:.2f} | {tuned(f, _md_code)} |"
                for i, f in enumerate(rows, 1)
            ]
            body = "".join(
                f'<tr><td class="r">{i}</td><td>{_context(f, _html_code)}</td>'
                f'<td>{_html_code(f.base_token)}</td><td class="r">{f.count}</td><td class="r">{f.n_problems}</td>'
                f'<td class="r">{f.n_reranked}</td><td class="r">{f.n_shifted}</td><td class="r">{f.rate:.2f}</td>'
                f"<td>{tuned(f, _html_code)}</td></tr>"
                for i, f in enumerate(rows, 1)
            )
            html_parts.append(
                f"<h3>{_h(title)}</h3><table><thead><tr>"
                + "".join(f"<th>{_h(x)}</th>" for x in ATLAS_HEADER)
                + f"</tr></thead><tbody>{body}</tbody></table>"
            )
    atomic_write_bytes(Path(out_dir) / "fork_atlas.md", ("\n".join(md) + "\n").encode("utf-8"))
    title = f"Fork atlas: {name}"
    html = (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                (
                    f"<title>{_h(title)}</title><style>{BASE_CSS}"
                    "code.t{background:#f3f3f3;border:1px solid #ddd;border-radius:2px;padding:0 .2em;margin-right:1px}</style>"
                ),
                "</head><body>",
                f"<h1>{_h(title)}</h1>",
                *html_parts,
                "<footer>Generated by reasonmaxxer.explorer. Self-contained: no external resources.</footer>",
                "</body></html>",
            ]
        )
        + "\n"
    )
    path = Path(out_dir) / "fork_atlas.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
