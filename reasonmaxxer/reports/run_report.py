"""End-of-run training report: one Markdown file and one self-contained HTML file.

`write_train_report(out_dir, data)` turns a plain JSON-able dict assembled by the training
pipeline into::

    out_dir/report.md            GitHub-flavoured Markdown; plots linked from plots/
    out_dir/report.html          ONE file: inline CSS, plots inlined as base64 PNG data: URIs,
                                 no scripts, no fonts, no network references
    out_dir/plots/*.png          entropy_hist.png, accuracy.png, curves.png

Both documents are rendered from the same list of blocks (headings, paragraphs, tables,
images, token examples), so they carry the same content. Every section of `data` except
``title`` is optional; a missing section becomes a one-line "not available" note. A
section that is present but malformed does not abort the report (it runs at the end of a
possibly hours-long run): it is replaced by a "could not be rendered" note and a
`RuntimeWarning` names the error.

Token text comes straight from the model and is treated as hostile: every string is
HTML-escaped (and, in Markdown, backslash-escaped), whitespace-only tokens are shown with
visible markers, and newlines stay line breaks.

Plots use matplotlib's object-oriented API with an explicit Agg canvas
(`FigureCanvasAgg`), which needs no display and, unlike ``matplotlib.use("Agg")``, does not
switch the process-wide backend of a caller who has an interactive one. Files are written
atomically (temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape as _h
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes

PLOT_NAMES = ("accuracy.png", "entropy_hist.png", "curves.png")


Z95 = 1.959963984540054


@dataclass(frozen=True)
class _Plot:
    name: str  # file name under plots/
    png: bytes
    alt: str


@dataclass(frozen=True)
class _Link:
    text: str
    href: str  # relative path; rendered as a link only if it has no URL scheme


class _Raw(str):
    """A table cell that is already rendered markup (not to be escaped again)."""


@dataclass(frozen=True)
class _Example:
    index: int
    ex: Mapping[str, Any]
    tau: float | None
    scale: tuple[float, float]  # entropy (nats) mapped to the lightest / darkest highlight
    max_tokens: int


# A block is one of: ("h2", str) | ("p", str) | ("note", str) | ("img", _Plot)
#                  | ("table", header: list[str], rows: list[list[str | _Link]], align: str)
#                  | ("example", _Example)
Block = tuple


def write_train_report(
    out_dir: str | Path,
    data: Mapping[str, Any],
    *,
    max_examples: int = 6,
    max_example_tokens: int = 1500,
) -> tuple[Path, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/plots/*.png; return (md, html) paths.

    `data` (plain JSON-able; only ``title`` is required):
      summary     {key: value}                          -> key/value table
      accuracy    {base, trained: {greedy, avg_at_n, n_problems, n_samples},
                   paired: {metric, n, mean_diff, low, high, wins, losses, ties}}
      entropy     {values: [nats, ...], tau, gated_fraction}
      examples    [{problem_id, correct, advantage, tokens: [{text, entropy, gated, top5}]}]
      curves      [{step, loss, decision, anchor, gated_fraction, grad_norm, lr, tokens_per_s,
                    val_accuracy | None}]
      timings     {stage: seconds};  selection {..., pass_rate_histogram: [counts]}
      artifacts   {name: path relative to out_dir}
      tables      [{title, header: [str], rows: [[cell]], note?}]   -> extra tables (breakdowns)
    At most `max_examples` rollouts are shown, each cut after `max_example_tokens` tokens.
    Raises ReasonMaxxerError only when `data` is not a dict or has no title.
    """
    if not isinstance(data, Mapping):
        raise ReasonMaxxerError(f"write_train_report: data must be a dict, got {type(data).__name__}")
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ReasonMaxxerError("write_train_report: data needs a non-empty string 'title'")
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    sections: list[tuple[str, str, Callable[..., list[Block]]]] = [
        ("Run summary", "summary", _sec_summary),
        ("Held-out accuracy", "accuracy", _sec_accuracy),
        ("Base-model entropy and the gate", "entropy", _sec_entropy),
        ("Data selection", "selection", _sec_selection),
        ("Breakdowns", "tables", _sec_tables),
        ("Gated tokens in context", "examples", _sec_examples),
        ("Training curves", "curves", _sec_curves),
        ("Stage timings", "timings", _sec_timings),
        ("Artifacts", "artifacts", _sec_artifacts),
    ]
    blocks: list[Block] = []
    for heading, key, fn in sections:
        blocks.append(("h2", heading))
        if data.get(key) in (None, {}, []):
            blocks.append(("note", f"Not available: the run data has no '{key}' section."))
            continue
        try:
            blocks.extend(fn(data[key], data, max_examples=max_examples, max_example_tokens=max_example_tokens))
        except Exception as e:  # noqa: BLE001 - a bad section must not lose the rest of the report
            warnings.warn(
                f"report: section '{key}' could not be rendered: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2
            )
            blocks.append(
                ("note", f"Not available: the '{key}' section could not be rendered ({type(e).__name__}: {e}).")
            )

    plots = [b[1] for b in blocks if b[0] == "img"]
    for p in plots:
        atomic_write_bytes(plots_dir / p.name, p.png)
    for stale in set(PLOT_NAMES) - {p.name for p in plots}:  # from an earlier run into the same dir
        (plots_dir / stale).unlink(missing_ok=True)

    from .. import __version__

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, _render_md(title, blocks, __version__).encode("utf-8"))
    atomic_write_bytes(html_path, _render_html(title, blocks, __version__).encode("utf-8"))
    return md_path, html_path


def _num(x: Any) -> float | None:
    """x as a float, or None when it is missing / not a number (bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    return float(x)


def fmt_number(x: Any, digits: int = 4) -> str:
    """A number to `digits` significant digits ('1.4', '0.0001', '149'); '—' when missing."""
    v = _num(x)
    if v is None:
        return "—" if x is None else str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{v:.{digits}g}"


def _acc(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.3f}"


def _signed(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:+.3f}"


def _pct(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{100 * v:.2f}%"


def _prob(p: Any) -> str:
    v = _num(p)
    if v is None:
        return "?"
    return f"{v:.3f}" if v >= 0.001 or v == 0 else f"{v:.1e}"


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def _value(x: Any) -> str:
    """A summary/selection value as one line of text."""
    if isinstance(x, (Mapping, list, tuple)):
        s = json.dumps(x, default=str, ensure_ascii=False)
        return s if len(s) <= 300 else s[:297] + "..."
    return fmt_number(x)


_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def visible_whitespace(text: str) -> str:
    """Token text with whitespace made visible ('␣the', '↵↵'); '∅' for the empty string."""
    return text.translate(_VISIBLE) if text else "∅"


def _gated(tok: Mapping[str, Any], tau: float | None) -> bool:
    g = tok.get("gated")
    if g is None and tau is not None and _num(tok.get("entropy")) is not None:
        return float(tok["entropy"]) > tau
    return bool(g)


def _top5(tok: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """The token's base top-5 as [(text, prob)], accepting [text, prob] pairs or {text, prob} dicts."""
    out = []
    for alt in tok.get("top5") or []:
        if isinstance(alt, Mapping):
            out.append((str(alt.get("text", alt.get("token", ""))), _num(alt.get("prob"))))
        else:
            out.append((str(alt[0]), _num(alt[1]) if len(alt) > 1 else None))
    return out


def _wilson(p: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval for a proportion p over n (p may be fractional, e.g. avg@n)."""
    z2 = Z95 * Z95
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _sec_summary(summary: Mapping[str, Any], data, **_) -> list[Block]:
    rows = [[str(k), _value(v)] for k, v in summary.items()]
    return [("table", ["field", "value"], rows, "ll")]


_METRICS = (("greedy", "greedy"), ("avg_at_n", "avg@n"))


def _sec_accuracy(acc: Mapping[str, Any], data, **_) -> list[Block]:
    base, trained = acc.get("base") or {}, acc.get("trained") or {}
    ns = {m.get("n_samples") for m in (base, trained) if m.get("n_samples") is not None}
    avg_label = f"avg@{ns.pop()}" if len(ns) == 1 else "avg@n"
    label = {"greedy": "greedy", "avg_at_n": avg_label}
    blocks: list[Block] = []
    if base or trained:
        rows = []
        for name, m in (("base", base), ("trained", trained)):
            if m:
                rows.append(
                    [
                        name,
                        _acc(m.get("greedy")),
                        _acc(m.get("avg_at_n")),
                        fmt_number(m.get("n_problems")),
                        fmt_number(m.get("n_samples")),
                    ]
                )
        if base and trained:
            diff = [
                _signed(trained[k] - base[k])
                if _num(trained.get(k)) is not None and _num(base.get(k)) is not None
                else "—"
                for k in ("greedy", "avg_at_n")
            ]
            rows.append(["trained − base", *diff, "", ""])
        blocks.append(("table", ["model", "greedy", avg_label, "problems", "samples/problem"], rows, "lrrrr"))
    else:
        blocks.append(("note", "Not available: no base or trained accuracy."))

    paired = acc.get("paired") or {}
    if paired:
        metric = label.get(paired.get("metric"), str(paired.get("metric", "?")))
        lo, hi = _num(paired.get("low")), _num(paired.get("high"))
        blocks.append(
            (
                "p",
                f"Paired difference, trained − base, per problem on the same "
                f"{fmt_number(paired.get('n'))} held-out problems ({metric}); 95% interval over problems:",
            )
        )
        blocks.append(
            (
                "table",
                ["metric", "problems", "mean difference", "95% interval", "wins", "losses", "ties"],
                [
                    [
                        metric,
                        fmt_number(paired.get("n")),
                        _signed(paired.get("mean_diff")),
                        _Raw(f"[{_signed(lo)}, {_signed(hi)}]"),
                        fmt_number(paired.get("wins")),
                        fmt_number(paired.get("losses")),
                        fmt_number(paired.get("ties")),
                    ]
                ],
                "lrrrrrr",
            )
        )
        if lo is not None and hi is not None:
            if lo > 0:
                verdict = "The interval excludes zero: the trained model is better on this metric."
            elif hi < 0:
                verdict = "The interval excludes zero: the trained model is worse on this metric."
            else:
                verdict = "The interval includes zero: no difference is resolved at this number of problems."
            blocks.append(("p", verdict))
    else:
        blocks.append(("note", "Not available: no paired (per-problem) difference."))

    plot = _try_plot(_plot_accuracy, base, trained, paired, label)
    blocks.append(plot)
    if plot[0] == "img" and (base or trained):
        blocks.append(
            (
                "p",
                "Whiskers on the bars: Wilson 95% interval over problems (conservative for "
                "avg@n, whose per-problem scores vary less than a coin flip's).",
            )
        )
    return blocks


def _sec_entropy(ent: Mapping[str, Any], data, **_) -> list[Block]:
    tau = _num(ent.get("tau"))
    tau_source = (data.get("summary") or {}).get("tau_source") if isinstance(data.get("summary"), Mapping) else None
    values = np.asarray([v for v in ent.get("values") or [] if _num(v) is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    rows = [
        ["tau (nats)", fmt_number(tau) + (f" ({tau_source})" if tau_source else "")],
        ["gated fraction (training gate)", _pct(ent.get("gated_fraction"))],
    ]
    if values.size:
        q = np.quantile(values, [0.5, 0.9, 0.99])
        rows += [
            ["completion tokens scored", str(values.size)],
            ["mean / median entropy (nats)", f"{values.mean():.3f} / {q[0]:.3f}"],
            ["90th / 99th percentile (nats)", f"{q[1]:.3f} / {q[2]:.3f}"],
        ]
        if tau is not None:
            rows.append(["fraction of these tokens with H > tau", _pct(float((values > tau).mean()))])
    blocks: list[Block] = [("table", ["quantity", "value"], rows, "lr")]
    if values.size:
        blocks.append(_try_plot(_plot_entropy, values, tau, _num(ent.get("gated_fraction"))))
    else:
        blocks.append(("note", "Not available: no per-token entropy values for a histogram."))
    return blocks


def _sec_tables(tables: Sequence[Mapping[str, Any]], data, **_) -> list[Block]:
    out: list[Block] = []
    for t in tables:
        out.append(("p", str(t["title"])))
        header = [str(h) for h in t["header"]]
        out.append(("table", header, [[_value(c) for c in row] for row in t["rows"]], "l" + "r" * (len(header) - 1)))
        if t.get("note"):
            out.append(("note", str(t["note"])))
    return out


def _sec_selection(sel: Mapping[str, Any], data, **_) -> list[Block]:
    rows = [[str(k).replace("_", " "), _value(v)] for k, v in sel.items() if k != "pass_rate_histogram"]
    blocks: list[Block] = [("table", ["quantity", "value"], rows, "lr")] if rows else []
    hist = sel.get("pass_rate_histogram")
    if hist:
        k = len(hist)
        bins = [f"[{i / k:.1f}, {(i + 1) / k:.1f}{']' if i == k - 1 else ')'}" for i in range(k)]
        blocks.append(("p", "Problems by base-model pass rate over their rollouts:"))
        blocks.append(("table", ["pass rate", *bins], [["problems", *[fmt_number(c) for c in hist]]], "l" + "r" * k))
    return blocks


def _sec_examples(
    examples: Sequence[Mapping[str, Any]], data, *, max_examples: int, max_example_tokens: int, **_
) -> list[Block]:
    tau = _num((data.get("entropy") or {}).get("tau")) if isinstance(data.get("entropy"), Mapping) else None
    if tau is None and isinstance(data.get("summary"), Mapping):
        tau = _num(data["summary"].get("tau"))
    shown = list(examples)[:max_examples]
    gated_h = [
        float(t["entropy"])
        for ex in shown
        for t in (ex.get("tokens") or [])[:max_example_tokens]
        if _gated(t, tau) and _num(t.get("entropy")) is not None
    ]
    lo = tau if tau is not None else (min(gated_h) if gated_h else 0.0)
    hi = max(gated_h + [lo + 1.0])
    tau_txt = f" (base entropy above tau = {fmt_number(tau)} nats)" if tau is not None else ""
    blocks: list[Block] = [
        (
            "p",
            f"Gated tokens{tau_txt} are marked in their rollout and numbered; the table "
            f"under each rollout gives the token's base entropy and the base model's top-5 "
            f"next tokens with probabilities (the sampled token in bold). Whitespace is "
            f"shown as ␣ (space) and ↵ (newline) where it matters.",
        )
    ]
    blocks += [("example", _Example(i + 1, ex, tau, (lo, hi), max_example_tokens)) for i, ex in enumerate(shown)]
    if len(examples) > len(shown):
        blocks.append(("note", f"{len(examples) - len(shown)} more example(s) in the run data are not shown."))
    return blocks


def _series(curves: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if _num(r.get(key)) is None else float(r[key]) for r in curves], dtype=np.float64)


def _sec_curves(curves: Sequence[Mapping[str, Any]], data, **_) -> list[Block]:
    steps = np.array([float(r["step"]) if _num(r.get("step")) is not None else float(i) for i, r in enumerate(curves)])
    parts = [f"{len(curves)} logged steps (step {fmt_number(steps[0])} to {fmt_number(steps[-1])})"]
    for key, name, fmt in (("loss", "final loss", fmt_number), ("gated_fraction", "final gated fraction", _pct)):
        s = _series(curves, key)
        ok = np.flatnonzero(np.isfinite(s))
        if ok.size:
            parts.append(f"{name} {fmt(float(s[ok[-1]]))}")
    tps = _series(curves, "tokens_per_s")
    if np.isfinite(tps).any():
        parts.append(f"median throughput {np.nanmedian(tps):,.0f} tokens/s")
    val = _series(curves, "val_accuracy")
    if np.isfinite(val).any():
        b = int(np.nanargmax(val))
        parts.append(f"best validation accuracy {_acc(val[b])} at step {fmt_number(steps[b])}")
    return [("p", "; ".join(parts) + "."), _try_plot(_plot_curves, steps, curves)]


def _sec_timings(timings: Mapping[str, Any], data, **_) -> list[Block]:
    secs = {str(k): _num(v) for k, v in timings.items()}
    total = sum(v for v in secs.values() if v is not None)
    rows = [
        [
            k,
            "—" if v is None else f"{v:,.1f}",
            "—" if v is None else _duration(v),
            "—" if v is None or total <= 0 else f"{100 * v / total:.1f}%",
        ]
        for k, v in secs.items()
    ]
    rows.append(["total", f"{total:,.1f}", _duration(total), "100.0%" if total > 0 else "—"])
    return [("table", ["stage", "seconds", "h:mm:ss", "share"], rows, "lrrr")]


def _sec_artifacts(artifacts: Mapping[str, Any], data, **_) -> list[Block]:
    rows = [[str(k), _Link(str(v), str(v))] for k, v in artifacts.items()]
    return [("p", "Paths are relative to this report's directory."), ("table", ["artifact", "path"], rows, "ll")]


def _try_plot(fn: Callable[..., _Plot | None], *args) -> Block:
    """Run a plot function; a failure becomes a note (and a warning), never a lost report."""
    try:
        p = fn(*args)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"report: plot {fn.__name__} failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return ("note", f"Plot not available ({type(e).__name__}: {e}).")
    return ("img", p) if p is not None else ("note", "Plot not available: nothing to plot.")


def new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: reproducible bytes
    return buf.getvalue()


def _plot_entropy(values: np.ndarray, tau: float | None, gated_fraction: float | None) -> _Plot:
    lo, hi = min(0.0, float(values.min())), max(float(values.max()), tau or 0.0) * 1.02 + 1e-9
    edges = np.linspace(lo, hi, 81)
    if tau is not None and lo < tau < hi:
        edges = np.unique(np.append(edges, tau))
    fig = new_figure(7, 3.8)
    ax = fig.add_subplot()
    if tau is None:
        ax.hist(values, bins=edges, log=True, color="#4878a8", label="completion tokens")
    else:
        frac = gated_fraction if gated_fraction is not None else float((values > tau).mean())
        ax.hist(values[values <= tau], bins=edges, log=True, color="#4878a8", label="below tau")
        ax.hist(
            values[values > tau],
            bins=edges,
            log=True,
            color="#e07b00",
            label=f"gated (H > tau): {100 * frac:.2f}% of tokens",
        )
        ax.axvline(tau, color="#a00000", linestyle="--", label=f"tau = {tau:.3g} nats")
    ax.set_xlabel("base-model entropy of the next-token distribution (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(f"Completion-token entropy under the base model ({values.size:,} tokens)")
    ax.legend(loc="upper right")
    return _Plot("entropy_hist.png", png_bytes(fig), "Histogram of base-model token entropy with the gate threshold")


def _plot_accuracy(base: Mapping, trained: Mapping, paired: Mapping, label: Mapping[str, str]) -> _Plot | None:
    metrics = [k for k, _ in _METRICS if _num(base.get(k)) is not None or _num(trained.get(k)) is not None]
    has_paired = _num(paired.get("mean_diff")) is not None
    if not metrics and not has_paired:
        return None
    fig = new_figure(8 if has_paired and metrics else 5, 3.6)
    axes = fig.subplots(1, 2, width_ratios=[2, 1]) if metrics and has_paired else [fig.add_subplot()]
    if metrics:
        ax = axes[0]
        x = np.arange(len(metrics))
        for j, (name, m, color) in enumerate((("base", base, "#8c8c8c"), ("trained", trained, "#2f7d32"))):
            ys = [_num(m.get(k)) for k in metrics]
            xs = x + (j - 0.5) * 0.38
            ax.bar(xs, [y if y is not None else 0 for y in ys], width=0.36, color=color, label=name)
            n = m.get("n_problems")
            for xi, y in zip(xs, ys):
                if y is not None and isinstance(n, int) and n > 0 and 0 <= y <= 1:
                    lo, hi = _wilson(y, n)
                    ax.errorbar(xi, y, yerr=[[y - lo], [hi - y]], color="black", capsize=4, lw=1)
                if y is not None and y > 0.06:  # value inside the bar, clear of the whisker
                    ax.text(xi, y / 2, f"{y:.3f}", ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(x, [label.get(k, k) for k in metrics])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("held-out accuracy")
        ax.legend(loc="upper left")
        ax.set_title("Base vs trained")
    if has_paired:
        ax = axes[-1]
        d = float(paired["mean_diff"])
        lo, hi = _num(paired.get("low")), _num(paired.get("high"))
        yerr = [[d - lo], [hi - d]] if lo is not None and hi is not None else None
        ax.errorbar([0], [d], yerr=yerr, fmt="o", color="#2f7d32", capsize=6)
        ax.annotate(f"{d:+.3f}", (0, d), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks([0], [label.get(paired.get("metric"), str(paired.get("metric", "")))])
        ax.set_xlim(-1, 1)
        ax.set_ylabel("trained − base (95% interval)")
        ax.set_title(f"Paired difference (n = {paired.get('n', '?')})")
    return _Plot("accuracy.png", png_bytes(fig), "Held-out accuracy of the base and trained models")


def _plot_curves(steps: np.ndarray, curves: Sequence[Mapping[str, Any]]) -> _Plot:
    fig = new_figure(10, 6.5)
    (a_loss, a_gate), (a_val, a_opt) = fig.subplots(2, 2, sharex=True)

    def line(ax, key, lab, scale=1.0, **kw):
        s = _series(curves, key) * scale
        ok = np.isfinite(s)
        if ok.any():
            ax.plot(steps[ok], s[ok], label=lab, marker="o" if ok.sum() < 30 else None, ms=3, **kw)
        return bool(ok.any())

    for key, lab in (("loss", "total loss"), ("decision", "decision term"), ("anchor", "anchor term (KL)")):
        line(a_loss, key, lab)
    a_loss.axhline(0, color="grey", lw=0.6)
    a_loss.set_title("Loss terms")
    if a_loss.lines[1:]:
        a_loss.legend(fontsize=8)
    if not line(a_gate, "gated_fraction", "gated fraction", 100.0, color="#e07b00"):
        a_gate.text(0.5, 0.5, "not logged", ha="center", va="center", transform=a_gate.transAxes)
    a_gate.set_title("Gated tokens (% of completion tokens)")
    if not line(a_val, "val_accuracy", "validation accuracy", color="#2f7d32"):
        a_val.text(0.5, 0.5, "no validation points", ha="center", va="center", transform=a_val.transAxes)
    a_val.set_title("Validation accuracy")
    a_val.set_xlabel("optimizer step")
    line(a_opt, "grad_norm", "grad norm (pre-clip)", color="#4878a8")
    a_opt.set_title("Gradient norm and learning rate")
    a_opt.set_xlabel("optimizer step")
    a_lr = a_opt.twinx()
    line(a_lr, "lr", "learning rate", color="#a00000", linestyle="--")
    a_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles = a_opt.get_legend_handles_labels()[0] + a_lr.get_legend_handles_labels()[0]
    if handles:
        a_opt.legend(handles=handles, fontsize=8, loc="best")
    return _Plot(
        "curves.png",
        png_bytes(fig),
        "Training curves: loss terms, gated fraction, validation accuracy, "
        "gradient norm and learning rate against optimizer step",
    )


_MD_ESCAPE = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


_MD_PUNCT = set("\\`*_[]|~$")


def _md(text: str) -> str:
    """Inline-safe Markdown for arbitrary text: HTML-special chars as entities, markup chars
    backslash-escaped. Newlines pass through (callers decide what a newline means)."""
    return "".join(_MD_ESCAPE.get(c) or ("\\" + c if c in _MD_PUNCT else c) for c in text)


def _md_cell(x: Any) -> str:
    if isinstance(x, _Link):
        return _md_link(x)
    if isinstance(x, _Raw):
        return str(x).replace("\n", " ")
    return _md(str(x)).replace("\r", "").replace("\n", " ")


def _is_punct(c: str) -> bool:
    return unicodedata.category(c)[0] in "PS"


def _md_bold(core: str, prev: str) -> str:
    """**core** when CommonMark will read the ** as an opener (it will not after a letter when
    the text starts with punctuation, e.g. 'x' + '(') - then <b>core</b>."""
    if not prev or prev.isspace() or _is_punct(prev) or not _is_punct(core[0]):
        return f"**{core}**"
    return f"<b>{core}</b>"


def _has_scheme(href: str) -> bool:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", href)
    return bool(m) and len(m.group(1)) > 1  # 'C:' is a Windows drive, not a scheme


def _md_link(link: _Link) -> str:
    if _has_scheme(link.href):
        return _md(link.text)
    href = link.href.replace(" ", "%20").replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")
    return f"[{_md(link.text)}]({href})"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return lines


_LINE_START = re.compile(r"^(\d{1,9})([.)])")


def _md_rollout_line(line: str) -> str:
    """One line of a rollout, safe to put after '> ': no accidental list/heading/code block."""
    stripped = line.lstrip(" ")
    line = "&nbsp;" * (len(line) - len(stripped)) + stripped
    if _LINE_START.match(line):
        line = _LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), line, count=1)
    elif line[:1] in ("#", "-", "+", "=", ":"):
        line = "\\" + line
    return line


def _example_header(e: _Example, tokens: Sequence[Mapping[str, Any]], n_gated: int) -> str:
    ex = e.ex
    correct = ex.get("correct")
    parts = [("correct" if correct else "incorrect") if correct is not None else "correctness unknown"]
    if _num(ex.get("advantage")) is not None:
        parts.append(f"advantage {float(ex['advantage']):+.2f}")
    parts.append(f"{len(tokens)} tokens")
    parts.append(f"{n_gated} gated ({100 * n_gated / max(len(tokens), 1):.1f}%)")
    return f"Example {e.index}: problem {ex.get('problem_id', '?')}; " + ", ".join(parts)


def _gated_rows(gated: Sequence[Mapping[str, Any]], bold: Callable[[str], str], esc: Callable[[str], str]):
    """Rows [#, token, H, top-5] for the table under a rollout."""
    rows = []
    for k, tok in enumerate(gated, 1):
        text = str(tok.get("text", ""))
        alts = _top5(tok)
        top = (
            " · ".join(
                (bold(esc(visible_whitespace(t))) if t == text else esc(visible_whitespace(t))) + f" {_prob(p)}"
                for t, p in alts
            )
            if alts
            else "not recorded"
        )
        rows.append([str(k), esc(visible_whitespace(text)), fmt_number(tok.get("entropy"), 3), top])
    return rows


def _md_example(e: _Example) -> list[str]:
    tokens = list(e.ex.get("tokens") or [])
    shown = tokens[: e.max_tokens]
    out: list[str] = []
    gated: list[Mapping[str, Any]] = []
    prev = ""  # last character emitted so far: decides whether ** can open
    for tok in shown:
        text = str(tok.get("text", "")).replace("\t", "    ")
        if not _gated(tok, e.tau):
            piece = _md(text)
        else:
            gated.append(tok)
            core = text.strip()
            if core:
                lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
                core_md = _md(core.replace("\r", "").replace("\n", "↵"))
            else:  # whitespace-only token: a visible marker, then its newlines as line breaks
                lead, trail, core_md = "", text.replace(" ", ""), visible_whitespace(text)
            piece = lead + _md_bold(core_md, (lead or prev)[-1:]) + f"<sup>{len(gated)}</sup>" + trail
        out.append(piece)
        prev = piece[-1:] or prev
    body = "".join(out).replace("\r", "").split("\n")
    lines = [f"**{_md(_example_header(e, tokens, len(gated)))}**", ""]
    lines += ["> " + _md_rollout_line(ln) + "  " for ln in body]
    if len(tokens) > len(shown):
        lines += [">", f"> _… {len(tokens) - len(shown)} more tokens not shown._"]
    lines.append("")
    if gated:
        rows = _gated_rows(gated, lambda s: f"**{s}**", _md)
        lines += _md_table(
            ["#", "token", "H (nats)", "base top-5"], [[r[0], _Raw(r[1]), r[2], _Raw(r[3])] for r in rows], "rlrl"
        )
    else:
        lines.append("_No gated tokens in the part shown._")
    return lines


def _render_md(title: str, blocks: Sequence[Block], version: str) -> str:
    lines = [f"# {_md(title)}", ""]
    for b in blocks:
        kind = b[0]
        if kind == "h2":
            lines += [f"## {_md(b[1])}", ""]
        elif kind == "p":
            lines += [_md(b[1]), ""]
        elif kind == "note":
            lines += [f"_{_md(b[1])}_", ""]
        elif kind == "table":
            lines += _md_table(b[1], b[2], b[3]) + [""]
        elif kind == "img":
            lines += [f"![{_md(b[1].alt)}](plots/{b[1].name})", ""]
        elif kind == "example":
            lines += _md_example(b[1]) + [""]
    lines.append(f"_Generated by reasonmaxxer {version}._")
    return "\n".join(lines) + "\n"


BASE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee}
h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.r{text-align:right;font-variant-numeric:tabular-nums}
td.tok,td.alts{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre.rollout{white-space:pre-wrap;overflow-wrap:anywhere;background:#fafafa;border:1px solid #ddd;
padding:.8em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.55}
span.g{border-radius:3px;box-shadow:0 0 0 1px rgba(180,80,0,.55);cursor:help}
sup.k{color:#a04000;font-size:65%;margin-left:1px}
.note{color:#777;font-style:italic}
img{max-width:100%;height:auto;border:1px solid #eee}
footer{margin-top:3em;color:#999;font-size:.85em}
"""


def _html_cell(x: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    if isinstance(x, _Link):
        inner = _h(x.text) if _has_scheme(x.href) else f'<a href="{_h(x.href)}">{_h(x.text)}</a>'
    elif isinstance(x, _Raw):
        inner = str(x)
    else:
        inner = _h(str(x))
    return f"<td{attr}>{inner}</td>"


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: str, classes: Sequence[str] | None = None
) -> str:
    cls = list(classes) if classes else ["r" if a == "r" else "" for a in align]
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_html_cell(c, cls[i] if i < len(cls) else "") for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tooltip(k: int, tok: Mapping[str, Any], tau: float | None) -> str:
    h = _num(tok.get("entropy"))
    lines = [
        f"#{k}  H = {h:.3f} nats" + (f" (tau {tau:.3g})" if tau is not None else "")
        if h is not None
        else f"#{k}  H not recorded"
    ]
    alts = _top5(tok)
    if alts:
        lines.append("base top-5:")
        lines += [f"  {_prob(p):>7}  {visible_whitespace(t)}" for t, p in alts]
    else:
        lines.append("top-5 not recorded")
    return "\n".join(lines)


def _html_example(e: _Example) -> str:
    tokens = list(e.ex.get("tokens") or [])
    shown = tokens[: e.max_tokens]
    lo, hi = e.scale
    out: list[str] = []
    gated: list[Mapping[str, Any]] = []
    for tok in shown:
        text = str(tok.get("text", ""))
        if not _gated(tok, e.tau):
            out.append(_h(text, quote=False))
            continue
        gated.append(tok)
        h = _num(tok.get("entropy"))
        frac = 0.5 if h is None or hi <= lo else min(max((h - lo) / (hi - lo), 0.0), 1.0)
        style = f"background:rgba(255,{int(200 - 110 * frac)},0,{0.25 + 0.6 * frac:.2f})"
        shown_text = _h(text, quote=False) if text.strip() else _h(visible_whitespace(text), quote=False)
        out.append(
            f'<span class="g" style="{style}" title="{_h(_tooltip(len(gated), tok, e.tau))}">'
            f'{shown_text}</span><sup class="k">{len(gated)}</sup>'
        )
        if not text.strip():
            out.append(_h(text.replace(" ", ""), quote=False))  # keep the token's newlines as line breaks
    more = (
        f'<p class="note">… {len(tokens) - len(shown)} more tokens not shown.</p>' if len(tokens) > len(shown) else ""
    )
    if gated:
        rows = _gated_rows(gated, lambda s: f"<b>{s}</b>", lambda s: _h(s, quote=False))
        table = _html_table(
            ["#", "token", "H (nats)", "base top-5"],
            [[r[0], _Raw(r[1]), r[2], _Raw(r[3])] for r in rows],
            "rlrl",
            classes=["r", "tok", "r", "alts"],
        )
    else:
        table = '<p class="note">No gated tokens in the part shown.</p>'
    return (
        f'<div class="example"><h3>{_h(_example_header(e, tokens, len(gated)))}</h3>'
        f'<pre class="rollout">{"".join(out)}</pre>{more}{table}</div>'
    )


def _render_html(title: str, blocks: Sequence[Block], version: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title><style>{BASE_CSS}</style></head><body>",
        f"<h1>{_h(title)}</h1>",
    ]
    for b in blocks:
        kind = b[0]
        if kind == "h2":
            parts.append(f"<h2>{_h(b[1])}</h2>")
        elif kind == "p":
            parts.append(f"<p>{_h(b[1])}</p>")
        elif kind == "note":
            parts.append(f'<p class="note">{_h(b[1])}</p>')
        elif kind == "table":
            parts.append(_html_table(b[1], b[2], b[3]))
        elif kind == "img":
            data = base64.b64encode(b[1].png).decode("ascii")
            parts.append(f'<p><img alt="{_h(b[1].alt)}" src="data:image/png;base64,{data}"></p>')
        elif kind == "example":
            parts.append(_html_example(b[1]))
    parts.append(
        f"<footer>Generated by reasonmaxxer {_h(version)}. Self-contained: no scripts, "
        f"no external resources.</footer></body></html>"
    )
    return "\n".join(parts) + "\n"
