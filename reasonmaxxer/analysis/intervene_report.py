"""What `intervene.run_intervene` writes besides intervene.json: the Markdown results table
(`render_markdown`) and the two plots, tau_sweep.png (`plot_tau_sweep`: touched % vs pass@1 over
tau) and intervene_bars.png (`plot_intervention_bars`: pass@1 per condition, the random control
as mean ± std over seeds, each bar annotated with the % of positions touched).
"""

from __future__ import annotations

import math
from pathlib import Path


def _f(x: float, nd: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render_markdown(rows: list[dict], config: dict) -> str:
    """The results table (pass@1 %, touched %) with the paper's expectation beside each row."""
    lines = [
        f"# Oracle interventions: {config['base']} vs {config['tuned']}",
        "",
        (
            f"Problems: {config['problems']} (n={config['n_problems']}), template {config['template']}, "
            f"greedy, max_new_tokens={config['max_new_tokens']}, strict grading. "
            "Touched = generated positions whose token differs from the base argmax."
        ),
        "",
        "| condition | pass@1 % | touched % | paper expects |",
        "|---|---|---|---|",
    ]
    for r in rows:
        p = r["pass_at_1"]
        if isinstance(p, dict):
            ps = f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f} ({100 * p['min']:.1f}-{100 * p['max']:.1f})"
            ts = f"{_f(r['touched_pct']['mean'], 2)} ± {_f(r['touched_pct']['std'], 2)}"
        else:
            ps, ts = _f(100 * p), _f(r["touched_pct"], 2)
        lines.append(f"| {r['condition']} | {ps} | {ts} | {r.get('paper', '')} |")
    lines += [
        "",
        "Under greedy decoding the oracle trajectory is the tuned greedy trajectory by construction;",
        "the random control is the mean ± sample std (min-max) over seeds.",
        "",
    ]
    return "\n".join(lines)


def plot_tau_sweep(sweep: list[dict], base_pass: float, tuned_pass: float, path: Path) -> None:
    """touched % (x) vs pass@1 % (y) for each tau, base / tuned as horizontal lines (PNG, atomic)."""
    from ..io import atomic_write_bytes
    from ..reports.plots import new_figure, png_bytes

    fig = new_figure(5.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["touched_pct"] for r in sweep]
    ys = [100 * r["pass_at_1"] for r in sweep]
    ax.plot(xs, ys, "o-", color="C2", label="entropy-gated")
    for x, y, r in zip(xs, ys, sweep):
        ax.annotate(f"τ={r['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(100 * base_pass, color="C0", ls="--", label="base")
    ax.axhline(100 * tuned_pass, color="C1", ls="--", label="tuned")
    ax.set_xlabel("tokens touched (%)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Entropy-gated intervention: tau sweep")
    ax.legend(loc="best", fontsize=8)
    atomic_write_bytes(Path(path), png_bytes(fig))


_BAR_COLOURS = {"base": "C0", "tuned": "C1", "oracle": "C3", "random": "C7", "entropy": "C2", "cross": "C4"}


def plot_intervention_bars(rows: list[dict], path: Path) -> None:
    """One bar per condition (the `run_intervene` rows, in order): greedy pass@1 %, the random
    control as its mean with a ± sample-std error bar, each bar annotated with the % of positions
    touched. The base's pass@1 is a dashed line. PNG, written atomically."""
    from ..io import atomic_write_bytes
    from ..reports.plots import new_figure, png_bytes

    labels, ys, errs, colours, notes = [], [], [], [], []
    for r in rows:
        p, t = r["pass_at_1"], r["touched_pct"]
        spread = isinstance(p, dict)
        labels.append(r["condition"].replace(" (greedy)", "").replace("entropy-gated ", "gated ").replace(" (", "\n("))
        ys.append(100 * (p["mean"] if spread else p))
        errs.append(100 * p["std"] if spread else math.nan)  # nan: no error bar
        tt = t["mean"] if isinstance(t, dict) else t
        notes.append("n/a" if tt is None or math.isnan(tt) else f"{tt:.2f}%")
        colours.append(next(c for k, c in _BAR_COLOURS.items() if r["condition"].startswith(k)))
    fig = new_figure(max(6.0, 0.75 * len(rows) + 1.5), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    bars = ax.bar(x, ys, yerr=errs, capsize=4, color=colours)
    ax.bar_label(
        bars,
        labels=[f"{y:.1f}" + ("" if math.isnan(e) else f" ± {e:.1f}") + f"\n{n}" for y, e, n in zip(ys, errs, notes)],
        fontsize=7,
        padding=2,
    )
    ax.axhline(ys[0], color="C0", ls="--", lw=1)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("greedy pass@1 (%)")
    ax.set_ylim(0, min(105.0, max(y + (0 if math.isnan(e) else e) for y, e in zip(ys, errs)) + 15))
    ax.set_title("Interventions: pass@1 (bar labels: pass@1 %, then % of positions touched)", fontsize=10)
    atomic_write_bytes(Path(path), png_bytes(fig))
