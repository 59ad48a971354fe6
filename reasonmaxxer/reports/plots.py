"""Plots of the reports, drawn with matplotlib's object-oriented API on an explicit Agg canvas
(`new_figure`): no display needed, and unlike ``matplotlib.use("Agg")`` the process-wide backend of
a caller with an interactive one is left alone. `png_bytes` writes no version string, so the bytes
are reproducible."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.stats import roc_curve, wilson_interval
from .format import as_float, fmt_number

Z95 = 1.959963984540054

# (data key, label) of the accuracy metrics, in plot order
METRICS = (("greedy", "greedy"), ("avg_at_n", "avg@n"))


@dataclass(frozen=True)
class Plot:
    name: str  # file name under plots/
    png: bytes
    alt: str


def series(curves: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """One logged quantity over the curve rows: [S] float64, nan where missing."""
    return np.array([np.nan if as_float(r.get(key)) is None else float(r[key]) for r in curves], dtype=np.float64)


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


def plot_entropy_hist(values: np.ndarray, tau: float | None, gated_fraction: float | None) -> Plot:
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
    return Plot("entropy_hist.png", png_bytes(fig), "Histogram of base-model token entropy with the gate threshold")


def plot_accuracy(base: Mapping, trained: Mapping, paired: Mapping, label: Mapping[str, str]) -> Plot | None:
    metrics = [k for k, _ in METRICS if as_float(base.get(k)) is not None or as_float(trained.get(k)) is not None]
    has_paired = as_float(paired.get("mean_diff")) is not None
    if not metrics and not has_paired:
        return None
    fig = new_figure(8 if has_paired and metrics else 5, 3.6)
    axes = fig.subplots(1, 2, width_ratios=[2, 1]) if metrics and has_paired else [fig.add_subplot()]
    if metrics:
        ax = axes[0]
        x = np.arange(len(metrics))
        for j, (name, m, color) in enumerate((("base", base, "#8c8c8c"), ("trained", trained, "#2f7d32"))):
            ys = [as_float(m.get(k)) for k in metrics]
            xs = x + (j - 0.5) * 0.38
            ax.bar(xs, [y if y is not None else 0 for y in ys], width=0.36, color=color, label=name)
            n = m.get("n_problems")
            for xi, y in zip(xs, ys):
                if y is not None and isinstance(n, int) and n > 0 and 0 <= y <= 1:
                    lo, hi = wilson_interval(y, n)
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
        lo, hi = as_float(paired.get("low")), as_float(paired.get("high"))
        yerr = [[d - lo], [hi - d]] if lo is not None and hi is not None else None
        ax.errorbar([0], [d], yerr=yerr, fmt="o", color="#2f7d32", capsize=6)
        ax.annotate(f"{d:+.3f}", (0, d), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks([0], [label.get(paired.get("metric"), str(paired.get("metric", "")))])
        ax.set_xlim(-1, 1)
        ax.set_ylabel("trained − base (95% interval)")
        ax.set_title(f"Paired difference (n = {paired.get('n', '?')})")
    return Plot("accuracy.png", png_bytes(fig), "Held-out accuracy of the base and trained models")


def plot_curves(steps: np.ndarray, curves: Sequence[Mapping[str, Any]]) -> Plot:
    fig = new_figure(10, 6.5)
    (a_loss, a_gate), (a_val, a_opt) = fig.subplots(2, 2, sharex=True)

    def line(ax, key, lab, scale=1.0, **kw):
        s = series(curves, key) * scale
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
    return Plot(
        "curves.png",
        png_bytes(fig),
        "Training curves: loss terms, gated fraction, validation accuracy, "
        "gradient norm and learning rate against optimizer step",
    )


def plot_diagnostics(steps: np.ndarray, curves: Sequence[Mapping[str, Any]]) -> Plot:
    """The decision diagnostics of metrics.jsonl (`core.losses.diagnostics_summary`): Delta-logp+/-
    of the taken gated tokens (trained vs base, nats) and the negative/positive pressure ratio."""
    fig = new_figure(10, 3.5)
    a_dlp, a_pr = fig.subplots(1, 2, sharex=True)
    for key, lab, color in (("dlogp_pos", "Δlogp+ (A > 0)", "#2f7d32"), ("dlogp_neg", "Δlogp− (A < 0)", "#a00000")):
        s = series(curves, key)
        ok = np.isfinite(s)
        if ok.any():
            a_dlp.plot(steps[ok], s[ok], label=lab, color=color, marker="o" if ok.sum() < 30 else None, ms=3)
    a_dlp.axhline(0, color="grey", lw=0.6)
    a_dlp.set_title("Mean change of log p(taken gated token) since the start, nats")
    a_dlp.set_xlabel("optimizer step")
    if a_dlp.lines[1:]:
        a_dlp.legend(fontsize=8)
    s = series(curves, "pressure_ratio")
    ok = np.isfinite(s)
    if ok.any():
        a_pr.plot(steps[ok], s[ok], color="#4878a8", marker="o" if ok.sum() < 30 else None, ms=3)
    a_pr.set_title("Negative / positive pressure")
    a_pr.set_xlabel("optimizer step")
    return Plot(
        "diagnostics.png",
        png_bytes(fig),
        "Decision diagnostics: Δlogp+ and Δlogp− of the gated tokens (trained vs base model) and the "
        "ratio of negative to positive pressure, against optimizer step",
    )


def plot_entropy_by_class(ent: np.ndarray, cls: np.ndarray, source: str = "base"):
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


def plot_ranks(rank: np.ndarray, k: int, source: str = "base"):
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


def plot_roc(ent: np.ndarray, cls: np.ndarray, source: str = "base"):
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
