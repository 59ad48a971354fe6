"""The method study's results: each finished cell's row (held-out avg@4 and greedy, transfer,
FLOPs) with paired bootstrap intervals against the base and ReasonMaxxer of the same seed,
aggregated into ``benchmarks/results/method_study.{json,md}``, the per-problem accuracies
(``method_study_problems.json``) and ``accuracy_vs_flops.png``.

Across sessions (``runs/`` is not committed): each finished cell's row, with its per-problem
accuracies, is kept in the results; a later session skips those cells and pairs new cells
against the stored per-problem values.
"""

from __future__ import annotations

import json
from pathlib import Path

from method_study_design import (
    BASELINES,
    BUDGETS,
    DATA_SEEDS,
    METHODS,
    ORDER,
    PENDING,
    REGIMES,
    RESULTS,
    ROOT,
    SEEDS,
    cell_dir,
    cells,
    stored_name,
)


def mean(acc: dict | None) -> float | None:
    """The mean of per-problem accuracies (None for a store that is not there)."""
    return None if acc is None else sum(acc.values()) / len(acc)


def per_problem(d: Path, which: str) -> dict | None:
    from reasonmaxxer.recipes.run_summary import per_problem_accuracy
    from reasonmaxxer.store import RolloutStore

    p = d / which
    return per_problem_accuracy(RolloutStore(p)) if (p / "manifest.json").is_file() else None


def evaluation(d: Path, name: str) -> dict | None:
    """The per-problem avg@4 of the `reasonmaxxer eval` dir ``d/name`` once it has finished
    (its eval.json written), else None: a transfer evaluation still running beside the
    aggregation (`--jobs`) is not read half-done."""
    return per_problem(d, f"{name}/samples") if (d / name / "eval.json").is_file() else None


def result_paths(regime: str) -> dict[str, Path]:
    """The committed files of one regime: ``method_study.json`` ... for ``short`` (the first
    regime), ``method_study_long.json`` ... for ``long``."""
    tag = "" if regime == "short" else f"_{regime}"
    return {
        "json": RESULTS / f"method_study{tag}.json",
        "problems": RESULTS / f"method_study{tag}_problems.json",
        "md": RESULTS / f"method_study{tag}.md",
        "png": RESULTS / f"accuracy_vs_flops{tag}.png",
    }


def stored(regime: str) -> tuple[dict, dict]:
    """(rows by (method, seed), per-problem accuracies by "method-sSEED") of the committed results."""
    rows, probs, paths = {}, {}, result_paths(regime)
    if paths["json"].is_file():
        for r in json.loads(paths["json"].read_text()).get("rows", []):
            rows[(r["method"], r["seed"])] = r
    if paths["problems"].is_file():
        probs = json.loads(paths["problems"].read_text())
    return rows, probs


def stored_cells(regime: str) -> set[str]:
    """Names ("method-sSEED") of the cells whose results are committed."""
    rows, probs = stored(regime)
    return set(probs) | {f"{m}-s{seed}" for m, seed in rows}


def reference_flops(first: Path, regime: str) -> float:
    """The FLOPs of ReasonMaxxer seed 0 (the budget unit) of `regime`, as `compare` counts them:
    from its run dir `first` when finished there, else from the committed results."""
    from reasonmaxxer.recipes.compare import read_reasonmaxxer_run

    if (first / "summary.json").is_file():
        return float(read_reasonmaxxer_run(first)["flops"])
    rows, _ = stored(regime)
    if ("reasonmaxxer", 0) not in rows:
        raise SystemExit(f"method_study: {first} is not finished and no stored ReasonMaxxer seed-0 row")
    return float(rows[("reasonmaxxer", 0)]["flops"])


def cell_row(d: Path, method: str, seed: int) -> tuple[dict, dict]:
    """(the table row, the per-problem accuracies {metric: {problem_id: acc}}) of a finished cell."""
    from reasonmaxxer.recipes.compare import read_reasonmaxxer_run

    info = read_reasonmaxxer_run(d)
    row = {"method": method, "seed": seed, "dir": f"{d.parent.name}/{d.name}", "flops": info.get("flops")}
    accs = {
        m: per_problem(d, sub) for m, sub in (("avg_at_4", "eval/trained/samples"), ("greedy", "eval/trained/greedy"))
    }
    for metric, acc in accs.items():
        row[metric] = mean(acc)
    base = per_problem(d, "eval/base/samples")
    row["base_avg_at_4"] = mean(base)
    row["mean_tokens"] = info.get("mean_tokens")  # completion tokens per sample, from eval.json
    row["base_mean_tokens"] = info.get("base", {}).get("mean_tokens")
    tr = evaluation(d, "transfer")
    tb = evaluation(d.parent, "transfer_base")
    row["transfer_avg_at_4"] = mean(tr)
    row["transfer_base_avg_at_4"] = mean(tb)
    return row, {k: v for k, v in accs.items() if v is not None}


def baseline_rows(d: Path, method: str, seed: int, first: Path) -> list[tuple[dict, dict]]:
    """[(row, per-problem accuracies)] of a baseline cell, one per budget evaluated so far: the
    evaluation at the first step whose counted FLOPs reach the budget (`eval_at_flops`).
    `first`: the regime's first cell (its run dir or base pack, `base_source`); `d`'s parent is
    named after the regime."""
    from reasonmaxxer.io import read_jsonl

    path = d / "curve.jsonl"
    curve = [r for _, r in read_jsonl(path, allow_empty=True, torn_tail=True)] if path.is_file() else []
    curve.sort(key=lambda r: r["step"])
    ref, out = reference_flops(first, d.parent.name), []
    base = per_problem(first, "eval/base/samples")
    tb = evaluation(d.parent, "transfer_base")
    for b in BUDGETS:
        pt = next((r for r in curve if r["flops"] >= b * ref * (1 - 1e-9)), None)
        if pt is None:
            continue
        e = d / "evals" / f"step-{pt['step']:05d}"
        accs = {m: per_problem(e, sub) for m, sub in (("avg_at_4", "samples"), ("greedy", "greedy"))}
        tr = evaluation(d, "transfer") if b == BUDGETS[-1] else None
        row = {"method": f"{method}@{b}x", "seed": seed, "dir": f"{d.parent.name}/{d.name}", "flops": pt["flops"]}
        row |= {"steps": pt["step"], "train_seconds": pt["train_seconds"]}
        row |= {m: mean(a) for m, a in accs.items()}
        row["base_avg_at_4"] = mean(base)
        row["transfer_avg_at_4"] = mean(tr)
        row["transfer_base_avg_at_4"] = mean(tb)
        out.append((row, {k: v for k, v in accs.items() if v is not None}))
    return out


def family(label: str) -> str:
    """The method of a row label: "rft" for "rft", "rft@2x" and the data replicate "rft.d1"."""
    return label.split("@")[0].split(".")[0]


def data_tag(label: str) -> str:
    """A data replicate's suffix (".d1" of "rft.d1"), else ""."""
    return label[len(label.split(".")[0]) :] if "@" not in label else ""


def aggregate(
    root: Path,
    regime: str,
    seeds,
    methods,
    baseline_seeds=(0,),
    budget_seeds=(0,),
    data_seeds=(),
    source: Path | None = None,
) -> tuple[dict, dict]:
    """(results, per-problem accuracies): the cells finished here, plus the committed rows of
    cells not present under ``root`` or outside this selection (kept from an earlier session,
    marked ``carried``: aggregating one method never drops the others' rows); pending: the cells
    of the whole study (every method, `SEEDS`) with no row yet. A row's
    method is its cell's label ("rft@2x"); the 1x ReasonMaxxer of the same seed is the reference.
    `source`: where the first cell's base stores are (`base_source`; default its dir under root)."""
    from reasonmaxxer.core.stats import mean_ci95, paired_bootstrap

    old_rows, probs = stored(regime)
    rows = {}
    todo = cells(regime, seeds, methods, baseline_seeds, budget_seeds, data_seeds)
    first = source or cell_dir(todo[0], root)
    selected = set()  # the row keys of this selection's cells (a GRPO cell: each budget's)
    for cell in todo:
        key = (cell["label"], cell["seed"])
        d = cell_dir(cell, root)
        selected |= (
            {(f"{cell['method']}@{b}x", cell["seed"]) for b in BUDGETS} if cell["method"] in BASELINES else {key}
        )
        if cell["method"] in BASELINES and (d / "curve.jsonl").is_file():
            for row, acc in baseline_rows(d, cell["method"], cell["seed"], first):
                rows[(row["method"], row["seed"])], probs[f"{row['method']}-s{row['seed']}"] = row, acc
        elif cell["method"] in BASELINES:
            for b in BUDGETS:
                k = (f"{cell['method']}@{b}x", cell["seed"])
                if k in old_rows:
                    rows[k] = {**old_rows[k], "carried": True}
        elif (d / "summary.json").is_file():
            rows[key], probs[cell["name"]] = cell_row(d, *key)
        elif key in old_rows:
            rows[key] = {**old_rows[key], "carried": True}
    for k in old_rows.keys() - selected:  # committed cells outside this selection keep their rows
        rows[k] = {**old_rows[k], "carried": True}
    if (first / "eval" / "base" / "samples" / "manifest.json").is_file():
        probs["base"] = {
            m: per_problem(first, f"eval/base/{sub}") for m, sub in (("avg_at_4", "samples"), ("greedy", "greedy"))
        }
    for (method, seed), row in rows.items():
        # the same seed's (and data replicate's) ReasonMaxxer; seed 0's where that one's
        # per-problem values are not kept
        ours = f"reasonmaxxer{data_tag(method)}"
        ref_seed = seed if f"{ours}-s{seed}" in probs else 0
        ref, base = probs.get(f"{ours}-s{ref_seed}", {}), probs.get("base", {})
        mine = probs.get(f"{method}-s{seed}", {})
        for metric in ("avg_at_4", "greedy"):
            if method != ours and metric in mine and metric in ref:  # (reasonmaxxer@2x: against its 1x)
                row[f"{metric}_vs_reasonmaxxer"] = {
                    **paired_bootstrap(mine[metric], ref[metric], seed=seed),
                    "ref_seed": ref_seed,
                }
            if metric in mine and base.get(metric):
                row[f"{metric}_vs_base"] = paired_bootstrap(mine[metric], base[metric], seed=seed)
    same_budget(rows.values(), probs)
    seeds_pooled, data_pooled = pooled(rows.values(), probs), pooled_data(rows.values(), probs)
    rank = {m: i for i, m in enumerate(ORDER)}
    rows = [rows[k] for k in sorted(rows, key=lambda k: (rank.get(family(k[0]), len(ORDER)), k))]
    by_method = {}
    for m in sorted({r["method"] for r in rows}):
        vals = [r["avg_at_4"] for r in rows if r["method"] == m and r["avg_at_4"] is not None]
        if vals:
            by_method[m] = {"seeds": len(vals), "avg_at_4_mean_ci95": mean_ci95(vals) if len(vals) > 1 else None}
    done = {f"{r['method']}-s{r['seed']}" for r in rows}
    design = todo + cells(
        regime, SEEDS, tuple(METHODS) + tuple(BASELINES), data_seeds=DATA_SEEDS
    )  # this selection's, then the whole study's
    pending = list(dict.fromkeys(stored_name(c) for c in design if stored_name(c) not in done))
    res = {
        "regime": regime,
        "design": {k: str(Path(v).relative_to(ROOT)) if k == "extends" else v for k, v in REGIMES[regime].items()},
        "rows": rows,
        "by_method": by_method,
        "pooled": seeds_pooled,
        "pooled_data": data_pooled,
        "cells_pending": pending,
        "not_in_study_yet": PENDING,
    }
    return res, probs


def same_budget(rows, probs: dict) -> None:
    """Pair each 2x / 4x row of another method ("grpo@2x", "rft@4x") with ReasonMaxxer at the same
    budget ("reasonmaxxer@2x", seed 0), where both per-problem values are kept: sets
    ``{metric}_vs_reasonmaxxer_same_budget`` (a 95% paired bootstrap over problems, fractions)."""
    from reasonmaxxer.core.stats import paired_bootstrap

    for row in rows:
        method, _, budget = row["method"].partition("@")
        if budget in ("", "1x") or method == "reasonmaxxer":
            continue
        ref, mine = probs.get(f"reasonmaxxer@{budget}-s0", {}), probs.get(f"{row['method']}-s{row['seed']}", {})
        for metric in ("avg_at_4", "greedy"):
            if metric in mine and metric in ref:
                row[f"{metric}_vs_reasonmaxxer_same_budget"] = paired_bootstrap(
                    mine[metric], ref[metric], seed=row["seed"]
                )


def pool(mine: list[str], ref: list[str], probs: dict, versus: bool = True) -> dict:
    """The per-problem values of the cells `mine` averaged per problem, against the base and
    (`versus`) against the same average over `ref`, each a 95% paired bootstrap over the problems
    all its inputs share ("n": avg@4's count; fractions). {} when a metric's values are missing."""
    from reasonmaxxer.core.stats import paired_bootstrap

    def average(keys: list[str], metric: str, problems: set) -> dict:
        return {p: sum(probs[k][metric][p] for k in keys) / len(keys) for p in problems}

    def has(key: str, metric: str = "avg_at_4") -> bool:
        return bool(probs.get(key, {}).get(metric))

    out = {}
    for metric in ("avg_at_4", "greedy"):
        # the base enters only avg@4's comparison (there is no greedy one against it)
        keys = mine + ref + (["base"] if metric == "avg_at_4" and has("base") else [])
        if not all(has(k, metric) for k in keys):
            continue
        problems = set.intersection(*(set(probs[k][metric]) for k in keys))
        if metric == "avg_at_4":
            out["n"] = len(problems)
            if has("base"):
                base = {p: probs["base"][metric][p] for p in problems}
                out["avg_at_4_vs_base"] = paired_bootstrap(average(mine, metric, problems), base)
        if versus:
            out[f"{metric}_vs_reasonmaxxer"] = paired_bootstrap(
                average(mine, metric, problems), average(ref, metric, problems)
            )
    return out


def pooled(rows, probs: dict) -> dict:
    """Each 1x method's seeds pooled (GRPO's 1x row included): on the seeds whose per-problem
    values are kept for the method and for ReasonMaxxer of the same seed (at least 2), every
    problem's accuracy is averaged over those seeds, for the method and for ReasonMaxxer, and
    the averages are compared (`pool`). The seeds are held fixed (3 training runs are too few to
    resample); the per-seed rows show their spread. {method: {"seeds": [0, 1, 2], "n": 150,
    "avg_at_4_vs_base": {...}, "avg_at_4_vs_reasonmaxxer": {...}, "greedy_vs_reasonmaxxer": {...}}}
    (ReasonMaxxer itself: only against the base)."""
    out = {}
    for m in sorted({r["method"] for r in rows if "@" not in r["method"] or r["method"].endswith("@1x")}):
        seeds = sorted(
            r["seed"] for r in rows if r["method"] == m and probs.get(f"{m}-s{r['seed']}", {}).get("avg_at_4")
        )
        seeds = [s for s in seeds if probs.get(f"reasonmaxxer-s{s}", {}).get("avg_at_4")]
        if len(seeds) >= 2:
            mine, ref = [f"{m}-s{s}" for s in seeds], [f"reasonmaxxer-s{s}" for s in seeds]
            out[m] = {"seeds": seeds, **pool(mine, ref, probs, versus=m != "reasonmaxxer")}
    return out


def pooled_data(rows, probs: dict) -> dict:
    """The `DATA_METHODS` over their data replicates (seed 0 on the shared rollouts, "rft.d1"
    ... on rollouts sampled afresh), each paired with ReasonMaxxer on the same rollouts, pooled
    as `pooled` pools seeds (at least 2 replicates), with each replicate's own differences ("each":
    the rows' mean differences to the base and to ReasonMaxxer, None where a row has none), since
    the pooled bootstrap resamples problems, not replicates, and ("between") the 95% Student-t
    interval [mean, low, high] over those differences (df = replicates - 1), which counts the
    spread between samples of the data and not the problems'. {method: {"replicates": [0, 1, 2], ...}}."""
    from reasonmaxxer.core.stats import t_mean_ci95

    out, rows = {}, list(rows)
    by = {r["method"]: r for r in rows if r["seed"] == 0}
    for m in sorted({family(r["method"]) for r in rows if data_tag(r["method"])}):
        reps = sorted(
            int(r["method"].rsplit(".d", 1)[1]) if data_tag(r["method"]) else 0
            for r in rows
            if r["seed"] == 0 and family(r["method"]) == m and "@" not in r["method"]
        )
        tag = lambda k: f".d{k}" if k else ""  # noqa: E731
        reps = [k for k in reps if all(probs.get(f"{x}{tag(k)}-s0", {}).get("avg_at_4") for x in (m, "reasonmaxxer"))]
        if len(reps) >= 2:
            mine, ref = [f"{m}{tag(k)}-s0" for k in reps], [f"reasonmaxxer{tag(k)}-s0" for k in reps]
            # the pooled interval holds the replicates fixed: their spread is shown beside it, and
            # a Student-t interval over the replicates' own differences says what it leaves out
            each = {
                key: [by.get(f"{m}{tag(k)}", {}).get(key, {}).get("mean_diff") for k in reps]
                for key in ("avg_at_4_vs_base", "avg_at_4_vs_reasonmaxxer")
            }
            between = {key: list(t_mean_ci95(xs)) for key, xs in each.items() if None not in xs}
            out[m] = {
                "replicates": reps,
                "each": each,
                "between": between,
                **pool(mine, ref, probs, versus=m != "reasonmaxxer"),
            }
    return out


def markdown(res: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def signed(x):  # a difference of fractions, in points
        return "-" if x is None else f"{100 * x:+.1f}"

    def diff(d, seed=None, label=""):
        if not d:
            return "-"
        other = f" (vs seed {d['ref_seed']})" if seed is not None and d.get("ref_seed", seed) != seed else ""
        other += f" (vs reasonmaxxer{data_tag(label)})" if data_tag(label) else ""  # the same rollouts'
        return f"{signed(d['mean_diff'])} [{signed(d['low'])}, {signed(d['high'])}]{other}"

    out = [
        f"Regime `{res['regime']}`: test `{res['design']['test_problems']}`, transfer `{res['design']['transfer_problems']}`.",
        "",
        "| method | seed | avg@4 | greedy | avg@4 - base (95% paired bootstrap) | avg@4 - ReasonMaxxer (95% paired bootstrap) "
        "| greedy - ReasonMaxxer | transfer avg@4 (base) | FLOPs |",
        "|---|---:|---:|---:|---|---|---|---|---:|",
    ]
    lengths = any(r.get("mean_tokens") is not None for r in res["rows"])
    if lengths:  # the completion length, where the cells measured it
        out[-2] += " tokens (base) |"
        out[-1] += "---:|"
    for r in res["rows"]:
        fl = "-" if r["flops"] is None else f"{r['flops']:.3g}"
        tok = r.get("mean_tokens"), r.get("base_mean_tokens")
        tok = "-" if tok[0] is None else f"{tok[0]:.1f} ({'-' if tok[1] is None else f'{tok[1]:.1f}'})"
        out.append(
            f"| {r['method']} | {r['seed']} | {pct(r['avg_at_4'])} (base {pct(r['base_avg_at_4'])}) | {pct(r['greedy'])} | "
            f"{diff(r.get('avg_at_4_vs_base'))} | {diff(r.get('avg_at_4_vs_reasonmaxxer'), r['seed'], r['method'])} | "
            f"{diff(r.get('greedy_vs_reasonmaxxer'), r['seed'], r['method'])} | "
            f"{pct(r['transfer_avg_at_4'])} ({pct(r['transfer_base_avg_at_4'])}) | {fl} |"
            + (f" {tok} |" if lengths else "")
        )
    same = [r for r in res["rows"] if r.get("avg_at_4_vs_reasonmaxxer_same_budget")]
    if same:
        out += ["", "At the same budget, against ReasonMaxxer at that budget (seed 0; 95% paired bootstrap):", ""]
        out += ["| method | seed | avg@4 - ReasonMaxxer, same budget | greedy - ReasonMaxxer, same budget |"]
        out += ["|---|---:|---|---|"]
        for r in same:
            out.append(
                f"| {r['method']} | {r['seed']} | {diff(r['avg_at_4_vs_reasonmaxxer_same_budget'])} | "
                f"{diff(r.get('greedy_vs_reasonmaxxer_same_budget'))} |"
            )
    if res.get("pooled"):
        out += [
            "",
            "Seeds pooled (each problem's accuracy averaged over the seeds; 95% paired bootstrap over problems):",
        ]
        out += [
            "",
            "| method | seeds | problems | avg@4 - base | avg@4 - ReasonMaxxer | greedy - ReasonMaxxer |",
            "|---|---|---:|---|---|---|",
        ]
        for m, p in res["pooled"].items():
            out.append(
                f"| {m} | {', '.join(map(str, p['seeds']))} | {p['n']} | {diff(p.get('avg_at_4_vs_base'))} | "
                f"{diff(p.get('avg_at_4_vs_reasonmaxxer'))} | {diff(p.get('greedy_vs_reasonmaxxer'))} |"
            )
    if res.get("pooled_data"):
        out += [
            "",
            "Data replicates pooled (seed 0, on rollouts sampled afresh with the sampling seed + k, each "
            "paired with ReasonMaxxer on the same rollouts; 0 = the shared rollouts; the intervals resample "
            'problems with the replicates held fixed, so the columns "each" give every replicate\'s own '
            "difference, in the replicates' order, and t [...] the 95% Student-t interval over those "
            "differences (df = replicates - 1; the replicates share the test problems, so it measures the "
            "spread between samples of the training rollouts, which the bootstrap leaves out):",
            "",
            "| method | replicates | problems | avg@4 - base | each | avg@4 - ReasonMaxxer | each | greedy - ReasonMaxxer |",
            "|---|---|---:|---|---|---|---|---|",
        ]

        def each(p: dict, key: str) -> str:
            xs, t = p.get("each", {}).get(key), p.get("between", {}).get(key)
            if xs is None or all(x is None for x in xs):
                return "-"
            over = f"; t [{signed(t[1])}, {signed(t[2])}]" if t else ""
            return " / ".join(signed(x) for x in xs) + over

        for m, p in res["pooled_data"].items():
            out.append(
                f"| {m} | {', '.join(map(str, p['replicates']))} | {p['n']} | {diff(p.get('avg_at_4_vs_base'))} | "
                f"{each(p, 'avg_at_4_vs_base')} | {diff(p.get('avg_at_4_vs_reasonmaxxer'))} | "
                f"{each(p, 'avg_at_4_vs_reasonmaxxer')} | {diff(p.get('greedy_vs_reasonmaxxer'))} |"
            )
    if res["cells_pending"]:
        out += ["", "Cells not run yet: " + ", ".join(res["cells_pending"]) + "."]
    if res["not_in_study_yet"]:
        out += ["", "Not in the study yet: " + "; ".join(res["not_in_study_yet"]) + "."]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # one colour per method; its budgets (rft, rft@2x, rft@4x; grpo@1x ...) joined on seed 0
    for i, m in enumerate(sorted({family(r["method"]) for r in res["rows"]})):
        pts = [
            (r["flops"], 100 * r["avg_at_4"], -1 if data_tag(r["method"]) else r["seed"])
            for r in res["rows"]
            if family(r["method"]) == m and r["flops"] and r["avg_at_4"] is not None
        ]
        if pts:
            c = f"C{i % 10}"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, label=m, s=18)
            line = sorted(p[:2] for p in pts if p[2] == 0)
            if len(line) > 1:
                ax.plot([p[0] for p in line], [p[1] for p in line], color=c, lw=1)
    base = [r["base_avg_at_4"] for r in res["rows"] if r["base_avg_at_4"] is not None]
    if base:
        ax.axhline(100 * base[0], color="gray", ls="--", lw=1, label="base")
    ax.set_xscale("log")
    ax.set_xlabel("method FLOPs (as `compare` counts them)")
    ax.set_ylabel("held-out avg@4 (%)")
    ax.set_title(f"method study, regime {res['regime']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(res: dict, probs: dict) -> None:
    from reasonmaxxer.io import atomic_write_bytes, atomic_write_json

    paths = result_paths(res["regime"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths["json"], res)
    atomic_write_json(paths["problems"], probs)
    atomic_write_bytes(paths["md"], markdown(res).encode())
    if res["rows"]:
        plot(res, paths["png"])
