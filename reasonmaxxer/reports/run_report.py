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

The HTML is rendered by templates/report.html.j2 (autoescaped); the plots are drawn by
`reports.plots`, the examples by `reports.examples`, the tables by `reports.tables.Table`. Files
are written atomically (temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes
from .examples import Example, example_html, example_markdown, is_gated
from .format import as_float, fmt_acc, fmt_duration, fmt_number, fmt_pct, fmt_signed, fmt_value
from .plots import Plot, plot_accuracy, plot_curves, plot_diagnostics, plot_entropy_hist, series
from .render import render
from .tables import Link, Raw, Table, md_escape

PLOT_NAMES = ("accuracy.png", "entropy_hist.png", "curves.png", "diagnostics.png")


# A block is one of: ("h2", str) | ("p", str) | ("note", str) | ("img", Plot)
#                  | ("table", header: list[str], rows: list[list[str | Link | Raw]], align: str)
#                  | ("example", Example)
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
    atomic_write_bytes(md_path, _rendermd_escape(title, blocks, __version__).encode("utf-8"))
    atomic_write_bytes(html_path, _render_html(title, blocks, __version__).encode("utf-8"))
    return md_path, html_path


def _sec_summary(summary: Mapping[str, Any], data, **_) -> list[Block]:
    rows = [[str(k), fmt_value(v)] for k, v in summary.items()]
    return [("table", ["field", "value"], rows, "ll")]


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
                        fmt_acc(m.get("greedy")),
                        fmt_acc(m.get("avg_at_n")),
                        fmt_number(m.get("n_problems")),
                        fmt_number(m.get("n_samples")),
                    ]
                )
        if base and trained:
            diff = [
                fmt_signed(trained[k] - base[k])
                if as_float(trained.get(k)) is not None and as_float(base.get(k)) is not None
                else "—"
                for k in ("greedy", "avg_at_n")
            ]
            rows.append(["trained − base", *diff, "", ""])
        blocks.append(("table", ["model", "greedy", avg_label, "problems", "samples/problem"], rows, "lrrrr"))
    else:
        blocks.append(("note", "Not available: no base or trained accuracy."))

    paired = acc.get("paired") or {}
    blocks += _paired_blocks(paired, label)
    plot = _try_plot(plot_accuracy, base, trained, paired, label)
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


def _paired_blocks(paired: Mapping[str, Any], label: Mapping[str, str]) -> list[Block]:
    """The paired (per-problem) difference: a sentence, a one-row table and the verdict."""
    blocks: list[Block] = []
    if paired:
        metric = label.get(paired.get("metric"), str(paired.get("metric", "?")))
        lo, hi = as_float(paired.get("low")), as_float(paired.get("high"))
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
                        fmt_signed(paired.get("mean_diff")),
                        Raw(f"[{fmt_signed(lo)}, {fmt_signed(hi)}]"),
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

    return blocks


def _sec_entropy(ent: Mapping[str, Any], data, **_) -> list[Block]:
    tau = as_float(ent.get("tau"))
    tau_source = (data.get("summary") or {}).get("tau_source") if isinstance(data.get("summary"), Mapping) else None
    values = np.asarray([v for v in ent.get("values") or [] if as_float(v) is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    rows = [
        ["tau (nats)", fmt_number(tau) + (f" ({tau_source})" if tau_source else "")],
        ["gated fraction (training gate)", fmt_pct(ent.get("gated_fraction"))],
    ]
    if values.size:
        q = np.quantile(values, [0.5, 0.9, 0.99])
        rows += [
            ["completion tokens scored", str(values.size)],
            ["mean / median entropy (nats)", f"{values.mean():.3f} / {q[0]:.3f}"],
            ["90th / 99th percentile (nats)", f"{q[1]:.3f} / {q[2]:.3f}"],
        ]
        if tau is not None:
            rows.append(["fraction of these tokens with H > tau", fmt_pct(float((values > tau).mean()))])
    blocks: list[Block] = [("table", ["quantity", "value"], rows, "lr")]
    if values.size:
        blocks.append(_try_plot(plot_entropy_hist, values, tau, as_float(ent.get("gated_fraction"))))
    else:
        blocks.append(("note", "Not available: no per-token entropy values for a histogram."))
    return blocks


def _sec_tables(tables: Sequence[Mapping[str, Any]], data, **_) -> list[Block]:
    out: list[Block] = []
    for t in tables:
        out.append(("p", str(t["title"])))
        header = [str(h) for h in t["header"]]
        out.append(("table", header, [[fmt_value(c) for c in row] for row in t["rows"]], "l" + "r" * (len(header) - 1)))
        if t.get("note"):
            out.append(("note", str(t["note"])))
    return out


def _sec_selection(sel: Mapping[str, Any], data, **_) -> list[Block]:
    rows = [[str(k).replace("_", " "), fmt_value(v)] for k, v in sel.items() if k != "pass_rate_histogram"]
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
    tau = as_float((data.get("entropy") or {}).get("tau")) if isinstance(data.get("entropy"), Mapping) else None
    if tau is None and isinstance(data.get("summary"), Mapping):
        tau = as_float(data["summary"].get("tau"))
    shown = list(examples)[:max_examples]
    gated_h = [
        float(t["entropy"])
        for ex in shown
        for t in (ex.get("tokens") or [])[:max_example_tokens]
        if is_gated(t, tau) and as_float(t.get("entropy")) is not None
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
    blocks += [("example", Example(i + 1, ex, tau, (lo, hi), max_example_tokens)) for i, ex in enumerate(shown)]
    if len(examples) > len(shown):
        blocks.append(("note", f"{len(examples) - len(shown)} more example(s) in the run data are not shown."))
    return blocks


def _sec_curves(curves: Sequence[Mapping[str, Any]], data, **_) -> list[Block]:
    steps = np.array(
        [float(r["step"]) if as_float(r.get("step")) is not None else float(i) for i, r in enumerate(curves)]
    )
    parts = [f"{len(curves)} logged steps (step {fmt_number(steps[0])} to {fmt_number(steps[-1])})"]
    for key, name, fmt in (("loss", "final loss", fmt_number), ("gated_fraction", "final gated fraction", fmt_pct)):
        s = series(curves, key)
        ok = np.flatnonzero(np.isfinite(s))
        if ok.size:
            parts.append(f"{name} {fmt(float(s[ok[-1]]))}")
    tps = series(curves, "tokens_per_s")
    if np.isfinite(tps).any():
        parts.append(f"median throughput {np.nanmedian(tps):,.0f} tokens/s")
    val = series(curves, "val_accuracy")
    if np.isfinite(val).any():
        b = int(np.nanargmax(val))
        parts.append(f"best validation accuracy {fmt_acc(val[b])} at step {fmt_number(steps[b])}")
    blocks = [("p", "; ".join(parts) + "."), _try_plot(plot_curves, steps, curves)]
    if any(np.isfinite(series(curves, k)).any() for k in ("dlogp_pos", "dlogp_neg", "pressure_ratio")):
        blocks.append(_try_plot(plot_diagnostics, steps, curves))
    return blocks


def _sec_timings(timings: Mapping[str, Any], data, **_) -> list[Block]:
    secs = {str(k): as_float(v) for k, v in timings.items()}
    total = sum(v for v in secs.values() if v is not None)
    rows = [
        [
            k,
            "—" if v is None else f"{v:,.1f}",
            "—" if v is None else fmt_duration(v),
            "—" if v is None or total <= 0 else f"{100 * v / total:.1f}%",
        ]
        for k, v in secs.items()
    ]
    rows.append(["total", f"{total:,.1f}", fmt_duration(total), "100.0%" if total > 0 else "—"])
    return [("table", ["stage", "seconds", "h:mm:ss", "share"], rows, "lrrr")]


def _sec_artifacts(artifacts: Mapping[str, Any], data, **_) -> list[Block]:
    rows = [[str(k), Link(str(v), str(v))] for k, v in artifacts.items()]
    return [("p", "Paths are relative to this report's directory."), ("table", ["artifact", "path"], rows, "ll")]


def _try_plot(fn: Callable[..., Plot | None], *args) -> Block:
    """Run a plot function; a failure becomes a note (and a warning), never a lost report."""
    try:
        p = fn(*args)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"report: plot {fn.__name__} failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return ("note", f"Plot not available ({type(e).__name__}: {e}).")
    return ("img", p) if p is not None else ("note", "Plot not available: nothing to plot.")


def _rendermd_escape(title: str, blocks: Sequence[Block], version: str) -> str:
    lines = [f"# {md_escape(title)}", ""]
    for b in blocks:
        kind = b[0]
        if kind == "h2":
            lines += [f"## {md_escape(b[1])}", ""]
        elif kind == "p":
            lines += [md_escape(b[1]), ""]
        elif kind == "note":
            lines += [f"_{md_escape(b[1])}_", ""]
        elif kind == "table":
            lines += Table(*b[1:]).markdown() + [""]
        elif kind == "img":
            lines += [f"![{md_escape(b[1].alt)}](plots/{b[1].name})", ""]
        elif kind == "example":
            lines += example_markdown(b[1]) + [""]
    lines.append(f"_Generated by reasonmaxxer {version}._")
    return "\n".join(lines) + "\n"


def _render_html(title: str, blocks: Sequence[Block], version: str) -> str:
    items = []
    for b in blocks:
        if b[0] == "table":
            items.append(("table", Table(*b[1:])))
        elif b[0] == "example":
            items.append(("example", example_html(b[1])))
        else:
            items.append(b)
    return render("report.html.j2", title=title, blocks=items, version=version)
