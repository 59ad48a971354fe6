"""Browse a token-level analysis (method.md section 2) as plots and self-contained HTML.

Reads what `analysis.run_analyze` wrote to ``out_dir`` (analysis.json, trajectories.jsonl) and
writes, next to it::

    out_dir/plots/entropy_reranked_vs_unshifted.png   base entropy at reranked vs unshifted positions
    out_dir/plots/rank_histogram.png                   base rank of the tuned argmax where they differ
    out_dir/plots/roc.png                              ROC of base entropy as a predictor of "reranked"
    out_dir/explorer.html                              every trajectory, token by token (one file)
    out_dir/fork_atlas.html, fork_atlas.md             the most frequent high-entropy "fork" contexts

explorer.html is ONE file: inline CSS, the per-token data as JSON in a
``<script type="application/json">`` block and ~40 lines of vanilla JS that show a panel on hover
(and pin it on click). No fonts, no network references.

Limitations, honestly:
- trajectories.jsonl stores, per position, the base entropy, base/tuned argmax ids, the tuned
  argmax's base rank, KL both ways, JS and the class, but NOT the base or tuned top-5 with
  probabilities. The panel therefore shows what is stored and the page says so.
- No tokenizer is loaded: token ids are turned into text from the (id, text) pairs seen in the
  completions themselves (every base argmax is, under greedy decoding, the next completion token).
  A tuned argmax never emitted anywhere shows as ``id 1234``.
- The prompt is not stored, so only completions are shown, and fork contexts never reach into it.

Token text is hostile: it is always HTML-escaped, the JSON block is escaped so it cannot close
its <script>, whitespace-only tokens are shown with visible markers. Plots use an explicit Agg
canvas (`report._figure`); files are written atomically.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape as _h
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ReasonMaxxerError
from .report import _CSS, _figure, _g, _png, _visible
from .store import atomic_write_bytes

PLOT_NAMES = ("entropy_reranked_vs_unshifted.png", "rank_histogram.png", "roc.png")
REQUIRED_KEYS = ("tokens", "token_ids", "base_entropy", "base_argmax", "tuned_argmax", "tuned_rank_in_base", "cls")
# base-entropy colour bins (nats): h0 < 0.1 <= h1 < 0.5 <= h2 < 1 <= h3 < 2 <= h4
ENTROPY_EDGES = (0.1, 0.5, 1.0, 2.0)
ENTROPY_COLOURS = ("transparent", "#fff3b0", "#ffd966", "#ffab40", "#ff6e6e")
NATS_TO_BITS = 1.4426950408889634


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Analysis:
    """analysis.json (config, summary) and the trajectories.jsonl records of one out_dir."""
    config: dict
    summary: dict
    records: list[dict]

    @property
    def k(self) -> int:
        return int(self.summary.get("k") or self.config.get("k") or 5)


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
    for ln, line in enumerate(tp.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReasonMaxxerError(f"explorer: {tp}:{ln}: not valid JSON ({e})") from None
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ReasonMaxxerError(f"explorer: {tp}:{ln}: missing field(s) {', '.join(missing)}")
        n = len(r["tokens"])
        bad = [k for k in REQUIRED_KEYS if len(r[k]) != n]
        if bad:
            raise ReasonMaxxerError(f"explorer: {tp}:{ln}: field(s) {', '.join(bad)} do not have one entry per token ({n})")
        records.append(r)
    return Analysis(meta.get("config") or {}, meta.get("summary") or {}, records)


def _flat(records: Sequence[dict], key: str, dtype=float) -> np.ndarray:
    """One per-position field over all trajectories, concatenated: [N]. None (nan in JSON) -> nan / -1."""
    fill = math.nan if dtype is float else -1
    return np.array([fill if v is None else v for r in records for v in r[key]], dtype=dtype)


def _vocab(records: Sequence[dict]) -> dict[int, str]:
    """token id -> text, from the (id, text) pairs of the completions."""
    out: dict[int, str] = {}
    for r in records:
        for i, t in zip(r["token_ids"], r["tokens"]):
            out.setdefault(int(i), str(t))
    return out


def _tok_text(vocab: dict[int, str], i: Any) -> str:
    return vocab[int(i)] if i is not None and int(i) in vocab else f"⟨id={i}⟩"


# ----------------------------------------------------------------------------- plots


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of `scores` [N] for boolean `labels` [N]: (fpr, tpr, auroc). Ties are one threshold
    step (a diagonal segment), so the trapezoid area equals the Mann-Whitney AUROC. nan if a class is empty."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), math.nan
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]            # last index of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr, fpr = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def analysis_plots(out_dir) -> list[Path]:
    """Write the three section-2 plots under out_dir/plots/ (see module docstring); return their paths."""
    a = load_analysis(out_dir)
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ent, cls = _flat(a.records, "base_entropy"), _flat(a.records, "cls", int)
    rank = _flat(a.records, "tuned_rank_in_base", int)
    paths = []
    for name, fig in zip(PLOT_NAMES, (_plot_entropy(ent, cls), _plot_ranks(rank[cls != 0], a.k), _plot_roc(ent, cls))):
        p = plots / name
        atomic_write_bytes(p, _png(fig))
        paths.append(p)
    return paths


def _plot_entropy(ent: np.ndarray, cls: np.ndarray):
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    ok = ~np.isnan(ent)
    hi = max(float(ent[ok].max()) if ok.any() else 1.0, 1e-6) * 1.02
    edges = np.linspace(0.0, hi, 61)
    for c, label, colour in ((0, "unshifted", "#4878a8"), (1, "reranked", "#e07b00")):
        v = ent[ok & (cls == c)]
        if v.size:
            ax.hist(v, bins=edges, log=True, alpha=0.6, color=colour,
                    label=f"{label} ({v.size:,}; mean {v.mean():.3g} nats)")
    ax.set_xlabel("base-model entropy of the next-token distribution (nats)")
    ax.set_ylabel("positions (log scale)")
    ax.set_title("Base entropy at reranked vs unshifted positions")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    return fig


def _plot_ranks(rank: np.ndarray, k: int):
    labels = [str(r) for r in range(1, k + 1)] + [f">{k}"]
    counts = [int((rank == r).sum()) for r in range(1, k + 1)] + [int((rank > k).sum())]
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    bars = ax.bar(labels, counts, color=["#4878a8"] * k + ["#c0392b"])
    ax.bar_label(bars, labels=[str(c) for c in counts])
    ax.set_xlabel("base rank of the tuned model's argmax (1 = base argmax)")
    ax.set_ylabel("changed positions")
    ax.set_title(f"Base rank of the tuned argmax ({rank.size:,} changed positions)")
    return fig


def _plot_roc(ent: np.ndarray, cls: np.ndarray):
    fpr, tpr, auc = roc_curve(ent, cls == 1)
    fig = _figure(4.8, 4.6)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#e07b00", label=f"base entropy (AUROC = {_g(auc, 3) if math.isfinite(auc) else 'n/a'})")
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="chance (0.5)")
    ax.set_xlabel("false positive rate (non-reranked positions)")
    ax.set_ylabel("true positive rate (reranked positions)")
    ax.set_title("Base entropy as a predictor of 'reranked'")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    return fig


# ----------------------------------------------------------------------------- explorer


def _entropy_bin(h: Any) -> int:
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return 0
    return int(np.searchsorted(ENTROPY_EDGES, float(h), side="right"))


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):.2f}%"


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else _g(x, digits)


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: '<', '>' and '&' as \\u escapes (cannot close the element)."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


_EXPLORER_CSS = """
pre.traj{white-space:pre-wrap;overflow-wrap:anywhere;background:#fafafa;border:1px solid #ddd;padding:.8em;
font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.7}
span.tok{cursor:pointer;border-radius:2px}
span.tok:hover,span.tok.sel{outline:2px solid #333}
""" + "".join(f"span.h{i}{{background:{c}}}\n" for i, c in enumerate(ENTROPY_COLOURS)) + """
span.reranked{box-shadow:inset 0 -3px 0 #1f6fd1;font-weight:600}
span.shifted{box-shadow:inset 0 -3px 0 #c0392b;border:1px dashed #c0392b;font-weight:600}
span.key{display:inline-block;padding:0 .5em;margin-right:.3em;border:1px solid #ccc;font-family:ui-monospace,monospace}
#panel{position:fixed;right:1em;bottom:1em;width:26em;background:#fff;border:1px solid #888;border-radius:4px;
padding:.6em .8em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
box-shadow:0 2px 8px rgba(0,0,0,.25)}
#panel:empty{display:none}
"""

# Reads the JSON block, then shows one position's numbers on hover; a click pins the panel
# (a second click on the same token unpins). Sets body[data-ready] = "1" when wired up.
_EXPLORER_JS = """
(function(){
var D=JSON.parse(document.getElementById('data').textContent), P=document.getElementById('panel'), pinned=null;
var CLS=['unshifted','reranked','shifted'];
function vis(s){return s===''?'\\u2205':s.replace(/ /g,'\\u2423').replace(/\\n/g,'\\u21b5').replace(/\\t/g,'\\u21e5').replace(/\\r/g,'\\u240d');}
function tx(i){return i===null?'?':(Object.prototype.hasOwnProperty.call(D.vocab,i)?vis(D.vocab[i]):'\\u27e8id='+i+'\\u27e9');}
function f(x,d){return x===null?'n/a':Number(x).toPrecision(d||3);}
function show(el){
  var t=D.traj[+el.dataset.t], j=+el.dataset.p, h=t.H[j];
  P.textContent=['trajectory #'+t.index+', position '+j+': '+CLS[t.cls[j]],
    'token             '+tx(t.ids[j]),
    'base entropy      '+f(h)+' nats'+(h===null?'':' ('+f(h*1.4427)+' bits)'),
    'base argmax       '+tx(t.ba[j]),
    'tuned argmax      '+tx(t.ta[j])+'   (base rank '+t.rank[j]+')',
    'KL(base||tuned)   '+f(t.kl[j])+' nats', 'KL(tuned||base)   '+f(t.rkl[j])+' nats', 'JS                '+f(t.js[j])+' nats',
    D.note].join('\\n');
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

TOP5_NOTE = ("trajectories.jsonl does not store the base or tuned top-5 with probabilities; "
             "shown here: the tuned argmax and its base rank.")


def _token_span(t: int, j: int, text: str, h: Any, c: int) -> str:
    cls = f"tok h{_entropy_bin(h)}" + {1: " reranked", 2: " shifted"}.get(int(c), "")
    if text.strip():
        return f'<span class="{cls}" data-t="{t}" data-p="{j}">{_h(text, quote=False)}</span>'
    # whitespace-only: visible markers inside the span, the newlines themselves after it
    span = f'<span class="{cls}" data-t="{t}" data-p="{j}">{_h(_visible(text), quote=False)}</span>'
    return span + "\n" * text.count("\n")


def _plots_html(out: Path) -> str:
    """The `analysis_plots` PNGs that exist, inlined as data: URIs (none: a note)."""
    imgs = [f'<img alt="{_h(n)}" style="max-width:32%" src="data:image/png;base64,'
            f'{base64.b64encode((out / "plots" / n).read_bytes()).decode("ascii")}">'
            for n in PLOT_NAMES if (out / "plots" / n).is_file()]
    return f"<p>{''.join(imgs)}</p>" if imgs else '<p class="note">No plots yet (run analysis_plots first).</p>'


def _rounded(xs: Sequence[Any], digits: int = 4) -> list:
    return [None if x is None else round(float(x), digits) for x in xs]


def write_explorer(out_dir, *, max_trajectories: int = 200) -> Path:
    """Write out_dir/explorer.html: the first `max_trajectories` completions, each token a
    ``<span class="tok hN [reranked|shifted]">`` coloured by base entropy; hover/click shows the
    position's numbers. A header carries the summary (% reranked / shifted, entropy ratio, AUROC)."""
    a = load_analysis(out_dir)
    recs = a.records[:max_trajectories]
    vocab = _vocab(a.records)
    s, cfg = a.summary, a.config
    title = f"Token explorer: {cfg.get('tuned', 'tuned')} vs {cfg.get('base', 'base')}"
    data = {"note": "note: " + TOP5_NOTE, "traj": [], "vocab": {}}
    needed: set[int] = set()
    body: list[str] = []
    for t, r in enumerate(recs):
        cls = [int(c) for c in r["cls"]]
        data["traj"].append({
            "index": r.get("index", t), "ids": r["token_ids"], "H": _rounded(r["base_entropy"]),
            "ba": r["base_argmax"], "ta": r["tuned_argmax"], "rank": r["tuned_rank_in_base"], "cls": cls,
            "kl": _rounded(r.get("kl_base_tuned") or [None] * len(cls)),
            "rkl": _rounded(r.get("kl_tuned_base") or [None] * len(cls)),
            "js": _rounded(r.get("js") or [None] * len(cls))})
        needed.update(int(i) for k in ("token_ids", "base_argmax", "tuned_argmax") for i in r[k] if i is not None)
        spans = "".join(_token_span(t, j, str(x), h, c)
                        for j, (x, h, c) in enumerate(zip(r["tokens"], r["base_entropy"], cls)))
        head = (f"#{r.get('index', t)}" + (f" · {r['problem_id']}" if r.get("problem_id") is not None else "")
                + f" · {len(cls)} tokens · {r.get('finish_reason', '?')} · "
                  f"{cls.count(1)} reranked, {cls.count(2)} shifted")
        body.append(f'<div class="trajectory"><h3>{_h(head)}</h3><pre class="traj">{spans}</pre></div>')
    data["vocab"] = {str(i): vocab[i] for i in sorted(needed) if i in vocab}

    rows = [("trajectories shown / total", f"{len(recs)} / {len(a.records)}"),
            ("positions compared", _num(s.get("n_positions"))),
            ("reranked", _pct(s.get("reranked_pct"))), ("shifted", _pct(s.get("shifted_pct"))),
            ("base entropy, reranked / unshifted (nats)",
             f"{_num(s.get('entropy_reranked'))} / {_num(s.get('entropy_unshifted'))}"),
            ("entropy ratio (reranked / unshifted)", _num(s.get("entropy_ratio")) + "x"),
            ("AUROC of base entropy for reranked", _num(s.get("auroc_entropy_reranked"))),
            ("mean base rank at changed positions", _num(s.get("mean_tuned_rank_changed")))]
    table = "<table><tbody>" + "".join(f"<tr><th>{_h(m)}</th><td>{_h(v)}</td></tr>" for m, v in rows) + "</tbody></table>"
    labels = [f"H < {ENTROPY_EDGES[0]}"] + [f"{lo} ≤ H < {hi}" for lo, hi in pairwise(ENTROPY_EDGES)] \
        + [f"H ≥ {ENTROPY_EDGES[-1]}"]
    legend = ("<p>Base entropy (nats): " + "".join(f'<span class="key h{i}">{_h(l)}</span>' for i, l in enumerate(labels))
              + ' — <span class="key reranked">reranked</span> tuned argmax in base top-'
              + f'{a.k} <span class="key shifted">shifted</span> outside it. '
              + "␣ ↵ ⇥ mark whitespace-only tokens. Hover a token for its numbers; click to pin.</p>")
    more = (f'<p class="note">{len(a.records) - len(recs)} more trajectories not shown '
            f"(max_trajectories={max_trajectories}).</p>" if len(a.records) > len(recs) else "")
    html = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title><style>{_CSS}{_EXPLORER_CSS}</style></head><body>",
        f"<h1>{_h(title)}</h1>",
        (f'<p>Problems <code>{_h(str(cfg.get("problems")))}</code>, greedy base decoding; '
        f"each completion token is the base argmax, coloured by the base entropy of the distribution that produced it.</p>"),
        table, _plots_html(Path(out_dir)), legend, f'<p class="note">{_h(TOP5_NOTE)}</p>', *body, more,
        '<div id="panel"></div>',
        f'<script type="application/json" id="data">{_script_json(data)}</script>',
        f"<script>{_EXPLORER_JS}</script>",
        "<footer>Generated by reasonmaxxer.explorer. Self-contained: no external resources.</footer>",
        "</body></html>"]) + "\n"
    path = Path(out_dir) / "explorer.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- fork atlas


@dataclass(frozen=True)
class Fork:
    """One fork context: the `context` token texts before a high-entropy position and the base argmax there."""
    context: tuple[str, ...]
    base_token: str
    count: int             # high-entropy positions with this (context, base argmax)
    n_problems: int        # distinct trajectories they occur in
    n_reranked: int
    n_shifted: int
    tuned_tokens: tuple[tuple[str, int], ...]   # the tuned argmax where it differs, most common first

    @property
    def rate(self) -> float:
        """Fraction of these positions where the tuned model reranks (cls 1)."""
        return self.n_reranked / self.count


def fork_atlas(analysis: Analysis, *, context_tokens: int = 3, tau: float | None = None) -> tuple[list[Fork], float]:
    """Group every position with base entropy > tau by (the `context_tokens` completion tokens
    before it, base argmax there); return (forks sorted by count desc, then rate desc, tau).

    tau defaults to the median base entropy at reranked positions. Contexts near the start of a
    completion are shorter (the prompt is not stored). Keys use token ids, display uses text.
    """
    if context_tokens < 0:
        raise ReasonMaxxerError(f"fork atlas: context_tokens must be >= 0 (got {context_tokens})")
    recs = analysis.records
    if tau is None:
        ent, cls = _flat(recs, "base_entropy"), _flat(recs, "cls", int)
        rr = ent[(cls == 1) & ~np.isnan(ent)]
        if not rr.size:
            raise ReasonMaxxerError("fork atlas: no reranked positions to take the median entropy from; pass tau")
        tau = float(np.median(rr))
    vocab = _vocab(recs)
    groups: dict[tuple, list] = defaultdict(lambda: [0, set(), 0, 0, Counter()])
    for t, r in enumerate(recs):
        ids = r["token_ids"]
        for j, (h, c) in enumerate(zip(r["base_entropy"], r["cls"])):
            if h is None or not float(h) > tau:
                continue
            key = (tuple(int(i) for i in ids[max(0, j - context_tokens) : j]), int(r["base_argmax"][j]))
            g = groups[key]
            g[0] += 1
            g[1].add(t)
            g[2] += int(c) == 1
            g[3] += int(c) == 2
            if int(c) != 0:
                g[4][_tok_text(vocab, r["tuned_argmax"][j])] += 1
    forks = [Fork(tuple(_tok_text(vocab, i) for i in ctx), _tok_text(vocab, b), g[0], len(g[1]), g[2], g[3],
                  tuple(g[4].most_common()))
             for (ctx, b), g in groups.items()]
    forks.sort(key=lambda f: (-f.count, -f.rate, f.context, f.base_token))
    return forks, tau


def _md_code(text: str) -> str:
    """Visible-whitespace token text for a Markdown table cell (inline code, pipes escaped)."""
    s = _visible(text).replace("|", "\\|").replace("`", "ˋ")
    return f"`{s}`"


def write_fork_atlas(out_dir, *, context_tokens: int = 3, top: int = 50, tau: float | None = None) -> Path:
    """Write out_dir/fork_atlas.html and out_dir/fork_atlas.md (the `top` most frequent forks,
    see `fork_atlas`); return the HTML path."""
    a = load_analysis(out_dir)
    forks, tau = fork_atlas(a, context_tokens=context_tokens, tau=tau)
    shown = forks[:top]
    n_high = sum(f.count for f in forks)
    intro = (f"Positions with base entropy > tau = {tau:.3g} nats ({tau * NATS_TO_BITS:.3g} bits): {n_high}, "
             f"in {len(forks)} distinct (context, base token) forks; context = the {context_tokens} completion "
             f"tokens before the position (shorter at the start of a completion). rate = fraction of the "
             f"fork's positions where the tuned model reranks. Top {len(shown)} by count.")
    header = ["#", "context", "base token", "count", "problems", "reranked", "shifted", "rate", "tuned instead"]

    def tuned(f: Fork, code) -> str:
        return ", ".join(f"{code(t)}×{n}" for t, n in f.tuned_tokens[:3]) or "—"

    md = [f"# Fork atlas: {a.config.get('tuned', 'tuned')} vs {a.config.get('base', 'base')}", "", intro, "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += [f"| {i} | {' '.join(_md_code(t) for t in f.context) or '(start)'} | {_md_code(f.base_token)} | {f.count} "
           f"| {f.n_problems} | {f.n_reranked} | {f.n_shifted} | {f.rate:.2f} | {tuned(f, _md_code)} |"
           for i, f in enumerate(shown, 1)]
    atomic_write_bytes(Path(out_dir) / "fork_atlas.md", ("\n".join(md) + "\n").encode("utf-8"))

    code = lambda t: f'<code class="t">{_h(_visible(t), quote=False)}</code>'
    rows = "".join(
        f"<tr><td class=\"r\">{i}</td><td>{''.join(code(t) for t in f.context) or '(start)'}</td>"
        f"<td>{code(f.base_token)}</td><td class=\"r\">{f.count}</td><td class=\"r\">{f.n_problems}</td>"
        f"<td class=\"r\">{f.n_reranked}</td><td class=\"r\">{f.n_shifted}</td><td class=\"r\">{f.rate:.2f}</td>"
        f"<td>{tuned(f, code)}</td></tr>" for i, f in enumerate(shown, 1))
    title = f"Fork atlas: {a.config.get('tuned', 'tuned')} vs {a.config.get('base', 'base')}"
    html = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        (f"<title>{_h(title)}</title><style>{_CSS}"
        "code.t{background:#f3f3f3;border:1px solid #ddd;border-radius:2px;padding:0 .2em;margin-right:1px}</style>"),
        "</head><body>", f"<h1>{_h(title)}</h1>", f"<p>{_h(intro)}</p>",
        "<table><thead><tr>" + "".join(f"<th>{_h(x)}</th>" for x in header) + f"</tr></thead><tbody>{rows}</tbody></table>",
        "<footer>Generated by reasonmaxxer.explorer. Self-contained: no external resources.</footer>",
        "</body></html>"]) + "\n"
    path = Path(out_dir) / "fork_atlas.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
