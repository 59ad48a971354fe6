"""The method study (issue 13): does ReasonMaxxer beat RFT and its own ablations, and where?

    python benchmarks/method_study.py --plan                  # the cells, and which are done
    python benchmarks/method_study.py                         # run what is missing, then aggregate
    python benchmarks/method_study.py --aggregate-only        # the table and plot from finished cells

Resumable by construction: each cell is a `reasonmaxxer run` directory under ``--root``
(default ``runs/method_study``); a cell whose ``summary.json`` exists is skipped, a cell cut
short resumes where its stages stopped (every stage of `run` is resumable), so the study can
be stopped at any point (Ctrl-C, end of a session) and continued later. After each cell the
results are aggregated into ``benchmarks/results/method_study.json`` (commit it), with a
markdown table (``method_study.md``) and ``accuracy_vs_flops.png``.

Design (what is run; ``--plan`` prints it):

- regime ``short``: the reference run's task (configs/arith.toml, the demo's until issue #13
  halved the demo: procedural arithmetic, 3-shot, <= 96 new tokens), but trained without the ``expr`` tier, so that ``arith:test:300:expr`` is a transfer column
  from a problem family no training problem comes from; held-out ``arith:test:300`` of the
  training mix (avg@4 and greedy). All methods share the base rollouts, the selection and the
  base evaluation (`reuse` of the first cell).
- methods: ``reasonmaxxer`` (the reference run's recipe), ``rft`` (SFT on the correct rollouts),
  ``positive_only``, ``random_gate`` (the entropy gate's count at random positions),
  ``all_tokens``, ``no_anchor``; seeds 0, 1, 2 (the training seed; data fixed).
- for each method and seed: held-out accuracy, FLOPs counted as `reasonmaxxer compare`
  counts them, and the paired difference to ReasonMaxxer of the same seed over the same
  problems with a 95% paired bootstrap interval (`core.stats.paired_bootstrap`).

- ``random_reward``: the random-reward control, ReasonMaxxer on the same rollouts with their
  correctness labels permuted across the pool (``[selection] rewards = "shuffled"``).
- ``faithful``: the official recipe's choices at this scale (G = 16 rollouts per problem, 50
  problems, the 80% trim with truncated rollouts counted wrong, unmixed groups kept,
  per-sequence normalisation, lr 1e-4 with warmup); its seed-0 cell samples its own rollouts
  and evaluates the base itself, its other seeds reuse them.

Across sessions (``runs/`` is not committed): each finished cell's row, with its per-problem
accuracies (``benchmarks/results/method_study_problems.json``), is kept in the results; a
later session skips those cells and pairs new cells against the stored per-problem values.
Only the first cell (ReasonMaxxer seed 0, whose base stores the others reuse) is re-run when
its directory is missing, which also checks that it reproduces its stored figures.

- ``grpo`` and ``grpo_entropy`` (80/20 gated GRPO), through TRL (`reasonmaxxer baseline`) on the
  same problems, prompt, grader and held-out sets, at 1x, 2x and 4x the FLOPs of ReasonMaxxer
  seed 0 (counted as `compare` counts them): one run per method and seed, capped at 4x
  (``--max-train-flops``) and evaluated where its counted FLOPs first reach 1x and 2x
  (``--eval-at-flops``; TRL's learning rate is constant, so the model there is what a run
  capped there would give). Rows ``grpo@1x`` ...; seed 0 only by default (``--baseline-seeds``):
  a run is hours on 2 CPU cores, checkpointed every 10 steps, so it resumes across sessions.

Not yet in the study (the issue asks for them): a long-solution regime (completions >= 100
tokens), and the cheap methods at 2x/4x budgets. ``--plan`` lists them as pending.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

RESULTS = ROOT / "benchmarks" / "results"
TRAIN_TIERS = "add1,addsub2,word1,word2"  # the default mix without expr (the transfer family)
REGIMES = {
    "short": {
        "extends": str(ROOT / "configs" / "arith.toml"),
        "train_problems": f"arith:train:80:{TRAIN_TIERS}",
        "validation_problems": f"arith:validation:32:{TRAIN_TIERS}",
        "test_problems": f"arith:test:300:{TRAIN_TIERS}",
        "transfer_problems": "arith:test:300:expr",
    },
}
METHODS = {
    "reasonmaxxer": {},
    "rft": {"train": {"variant": "rft"}},
    "positive_only": {"train": {"variant": "positive_only"}},
    "random_gate": {"train": {"gate": "random"}},
    "all_tokens": {"train": {"variant": "all_tokens"}},
    "no_anchor": {"train": {"variant": "no_anchor"}},
    # the random-reward control (arXiv:2506.10947): the reference recipe on rollouts whose
    # correctness labels are permuted across the selection pool (`[selection] rewards`)
    "random_reward": {"selection": {"rewards": "shuffled"}},
    # the official recipe's choices (configs/paper/*.toml cites the lines) at this scale: G = 16
    # rollouts per problem, the 50 clearest mixed problems, the shortest 80% kept globally with
    # truncated rollouts counted wrong and unmixed groups kept (A = 0, anchor only), per-sequence
    # normalisation, rows without a gated token trained on the anchor, lr 1e-4 with 25% warmup
    "faithful": {
        "sampling": {"n": 16},
        "selection": {"max_problems": 50, "keep_shortest": 0.8, "truncated": "keep", "keep_unmixed": True},
        "train": {"normalisation": "per_sequence", "skip_ungated": False, "lr": 1e-4, "warmup_steps": 40},
    },
}
# RL through TRL: study method -> `reasonmaxxer baseline` method
BASELINES = {"grpo": "grpo", "grpo_entropy": "grpo-entropy"}
BUDGETS = (1, 2, 4)  # x the FLOPs of ReasonMaxxer seed 0
ORDER = ("reasonmaxxer", "rft", "random_reward", "grpo", "faithful", "grpo_entropy")  # run first, in this order
PENDING = [
    "long-solution regime (completions >= 100 tokens)",
    "the cheap methods (ReasonMaxxer, RFT, ablations) at 2x/4x budgets",
]


def cells(regime: str, seeds, methods, baseline_seeds=(0,)) -> list[dict]:
    """The study's cells in run order: ReasonMaxxer seed 0 first (its base stores are reused)."""
    out = []
    for m in methods:
        for seed in baseline_seeds if m in BASELINES else seeds:
            out.append({"regime": regime, "method": m, "seed": seed, "name": f"{m}-s{seed}"})
    # ReasonMaxxer seed 0 first (the others reuse its base stores), then ReasonMaxxer and RFT
    # over the seeds (the comparison the study must decide), then the rest of ORDER, then the
    # ablations
    rank = {m: i for i, m in enumerate(ORDER)}
    out.sort(
        key=lambda c: (
            c["seed"] != seeds[0] or c["method"] != "reasonmaxxer",
            rank.get(c["method"], len(ORDER)),
            c["seed"],
        )
    )
    return out


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def cell_config(cell: dict, root: Path, first: Path) -> str:
    """The TOML of one cell: the regime over the reference run (arith.toml), the method's overrides, the seed."""
    reg = REGIMES[cell["regime"]]
    out = root / cell["regime"] / cell["name"]
    top = {k: v for k, v in reg.items() if k != "transfer_problems"}
    top["out"] = str(out)
    # reuse the base stores of the first cell; a method with its own sampling (faithful: G = 16)
    # the rollouts of its own seed-0 cell (the first one samples and evaluates the base itself)
    src = out.parent / f"{cell['method']}-s0" if "sampling" in METHODS[cell["method"]] else first
    if out != src:
        top["reuse"] = str(src)
    tables = {"eval": {"n": 4}, "train": {"seed": cell["seed"]}}
    for t, kv in METHODS[cell["method"]].items():
        tables.setdefault(t, {}).update(kv)
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for t, kv in tables.items():
        lines += ["", f"[{t}]"] + [f"{k} = {toml_value(v)}" for k, v in kv.items()]
    return "\n".join(lines) + "\n"


def run_cell(cell: dict, root: Path, first: Path, threads: int) -> float:
    d = root / cell["regime"] / cell["name"]
    d.mkdir(parents=True, exist_ok=True)
    if cell["method"] in BASELINES:
        return run_baseline_cell(cell, d, first, threads)
    cfg = d.parent / f"{cell['name']}.toml"
    cfg.write_text(cell_config(cell, root, first))
    t0 = time.time()
    cmd = [sys.executable, "-m", "reasonmaxxer", "run", str(cfg)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True, cwd=ROOT)
    transfer(cell, d)
    return time.time() - t0


def reference_flops(first: Path) -> float:
    """The FLOPs of ReasonMaxxer seed 0 (the budget unit), as `compare` counts them."""
    from reasonmaxxer.recipes.compare import read_reasonmaxxer_run

    if (first / "summary.json").is_file():
        return float(read_reasonmaxxer_run(first)["flops"])
    rows, _ = stored()
    if ("reasonmaxxer", 0) not in rows:
        raise SystemExit(f"method_study: {first} is not finished and no stored ReasonMaxxer seed-0 row")
    return float(rows[("reasonmaxxer", 0)]["flops"])


def run_baseline_cell(cell: dict, d: Path, first: Path, threads: int) -> float:
    """`reasonmaxxer baseline` on the regime's problems (the prompt, model and lengths of the
    ReasonMaxxer cells), capped at the largest budget and evaluated at the others."""
    reg, ref = REGIMES[cell["regime"]], reference_flops(first)
    rc = json.loads((first / "run_config.json").read_text())
    t0 = time.time()
    cmd = [sys.executable, "-m", "reasonmaxxer", "baseline", BASELINES[cell["method"]], "--out", str(d)]
    cmd += ["--model", rc["model"], "--template", rc["template"], "--seed", str(cell["seed"])]
    cmd += ["--train-problems", reg["train_problems"], "--test-problems", reg["test_problems"]]
    cmd += ["--max-new-tokens", str(rc["sampling"]["max_new_tokens"]), "--max-steps", "100000", "--eval-every", "0"]
    cmd += ["--max-train-flops", repr(BUDGETS[-1] * ref), "--eval-at-flops"] + [repr(b * ref) for b in BUDGETS[:-1]]
    subprocess.run(cmd + (["--threads", str(threads)] if threads else []), check=True, cwd=ROOT)
    transfer(cell, d)
    return time.time() - t0


def finished(cell: dict, d: Path) -> bool:
    return (d / ("result.json" if cell["method"] in BASELINES else "summary.json")).is_file()


def stored_name(cell: dict) -> str:
    """The name under which a cell's (last) row is stored: "method-sSEED", "grpo@4x-sSEED"."""
    m = f"{cell['method']}@{BUDGETS[-1]}x" if cell["method"] in BASELINES else cell["method"]
    return f"{m}-s{cell['seed']}"


def transfer(cell: dict, d: Path) -> None:
    """The trained model (and, once, the base) on the transfer family: `reasonmaxxer eval`."""
    reg = REGIMES[cell["regime"]]
    trained = d / "adapter" if cell["method"] in BASELINES else d / "train" / "merged"
    for name, model in (("transfer", trained), ("transfer_base", None)):
        if name == "transfer_base" and (d.parent / "transfer_base" / "eval.json").is_file():
            continue
        out = d / name if name == "transfer" else d.parent / "transfer_base"
        if (out / "eval.json").is_file():
            continue
        spec = str(model) if model else model_of(d)
        cmd = [sys.executable, "-m", "reasonmaxxer", "eval", "--model", spec, "--problems", reg["transfer_problems"]]
        cmd += ["--n", "4", "--temperature", "0.7", "--max-new-tokens", "96", "--greedy", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT)


def model_of(d: Path) -> str:
    """The base model of a cell: a `run` dir's or a `baseline` dir's."""
    if (d / "run_config.json").is_file():
        return json.loads((d / "run_config.json").read_text())["model"]
    return json.loads((d / "baseline_config.json").read_text())["baseline"]["model"]


# -- aggregation ----------------------------------------------------------------------------
def mean(acc: dict | None) -> float | None:
    """The mean of per-problem accuracies (None for a store that is not there)."""
    return None if acc is None else sum(acc.values()) / len(acc)


def per_problem(d: Path, which: str) -> dict | None:
    from reasonmaxxer.recipes.run_summary import per_problem_accuracy
    from reasonmaxxer.store import RolloutStore

    p = d / which
    return per_problem_accuracy(RolloutStore(p)) if (p / "manifest.json").is_file() else None


def stored() -> tuple[dict, dict]:
    """(rows by (method, seed), per-problem accuracies by "method-sSEED") of the committed results."""
    rows, probs = {}, {}
    if (RESULTS / "method_study.json").is_file():
        for r in json.loads((RESULTS / "method_study.json").read_text()).get("rows", []):
            rows[(r["method"], r["seed"])] = r
    if (RESULTS / "method_study_problems.json").is_file():
        probs = json.loads((RESULTS / "method_study_problems.json").read_text())
    return rows, probs


def stored_cells() -> set[str]:
    """Names ("method-sSEED") of the cells whose results are committed."""
    rows, probs = stored()
    return set(probs) | {f"{m}-s{seed}" for m, seed in rows}


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
    tr = per_problem(d, "transfer/samples")
    tb = per_problem(d.parent, "transfer_base/samples")
    row["transfer_avg_at_4"] = mean(tr)
    row["transfer_base_avg_at_4"] = mean(tb)
    return row, {k: v for k, v in accs.items() if v is not None}


def baseline_rows(d: Path, method: str, seed: int, first: Path) -> list[tuple[dict, dict]]:
    """[(row, per-problem accuracies)] of a baseline cell, one per budget evaluated so far: the
    evaluation at the first step whose counted FLOPs reach the budget (`eval_at_flops`)."""
    from reasonmaxxer.io import read_jsonl

    path = d / "curve.jsonl"
    curve = [r for _, r in read_jsonl(path, allow_empty=True, torn_tail=True)] if path.is_file() else []
    curve.sort(key=lambda r: r["step"])
    ref, out = reference_flops(first), []
    base = per_problem(first, "eval/base/samples")
    tb = per_problem(d.parent, "transfer_base/samples")
    for b in BUDGETS:
        pt = next((r for r in curve if r["flops"] >= b * ref * (1 - 1e-9)), None)
        if pt is None:
            continue
        e = d / "evals" / f"step-{pt['step']:05d}"
        accs = {m: per_problem(e, sub) for m, sub in (("avg_at_4", "samples"), ("greedy", "greedy"))}
        tr = per_problem(d, "transfer/samples") if b == BUDGETS[-1] else None
        row = {"method": f"{method}@{b}x", "seed": seed, "dir": f"{d.parent.name}/{d.name}", "flops": pt["flops"]}
        row |= {"steps": pt["step"], "train_seconds": pt["train_seconds"]}
        row |= {m: mean(a) for m, a in accs.items()}
        row["base_avg_at_4"] = mean(base)
        row["transfer_avg_at_4"] = mean(tr)
        row["transfer_base_avg_at_4"] = mean(tb)
        out.append((row, {k: v for k, v in accs.items() if v is not None}))
    return out


def aggregate(root: Path, regime: str, seeds, methods, baseline_seeds=(0,)) -> tuple[dict, dict]:
    """(results, per-problem accuracies): the cells finished here, plus the committed rows of
    cells not present under ``root`` (kept from an earlier session, marked ``carried``)."""
    from reasonmaxxer.core.stats import mean_ci95, paired_bootstrap

    old_rows, probs = stored()
    rows = {}
    todo = cells(regime, seeds, methods, baseline_seeds)
    first = root / regime / todo[0]["name"]
    for cell in todo:
        key = (cell["method"], cell["seed"])
        d = root / regime / cell["name"]
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
    if (first / "eval" / "base" / "samples" / "manifest.json").is_file():
        probs["base"] = {
            m: per_problem(first, f"eval/base/{sub}") for m, sub in (("avg_at_4", "samples"), ("greedy", "greedy"))
        }
    for (method, seed), row in rows.items():
        # the same seed's ReasonMaxxer; seed 0's where that one's per-problem values are not kept
        ref_seed = seed if f"reasonmaxxer-s{seed}" in probs else 0
        ref, base = probs.get(f"reasonmaxxer-s{ref_seed}", {}), probs.get("base", {})
        mine = probs.get(f"{method}-s{seed}", {})
        for metric in ("avg_at_4", "greedy"):
            if method != "reasonmaxxer" and metric in mine and metric in ref:
                row[f"{metric}_vs_reasonmaxxer"] = {
                    **paired_bootstrap(mine[metric], ref[metric], seed=seed),
                    "ref_seed": ref_seed,
                }
            if metric in mine and base.get(metric):
                row[f"{metric}_vs_base"] = paired_bootstrap(mine[metric], base[metric], seed=seed)
    rank = {m: i for i, m in enumerate(ORDER)}
    rows = [rows[k] for k in sorted(rows, key=lambda k: (rank.get(k[0].split("@")[0], len(ORDER)), k))]
    by_method = {}
    for m in sorted({r["method"] for r in rows}):
        vals = [r["avg_at_4"] for r in rows if r["method"] == m and r["avg_at_4"] is not None]
        if vals:
            by_method[m] = {"seeds": len(vals), "avg_at_4_mean_ci95": mean_ci95(vals) if len(vals) > 1 else None}
    done = {f"{r['method']}-s{r['seed']}" for r in rows}
    pending = [stored_name(c) for c in todo if stored_name(c) not in done]
    res = {
        "regime": regime,
        "design": {k: str(Path(v).relative_to(ROOT)) if k == "extends" else v for k, v in REGIMES[regime].items()},
        "rows": rows,
        "by_method": by_method,
        "cells_pending": pending,
        "not_in_study_yet": PENDING,
    }
    return res, probs


def markdown(res: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def diff(d, seed=None):
        if not d:
            return "-"
        other = f" (vs seed {d['ref_seed']})" if seed is not None and d.get("ref_seed", seed) != seed else ""
        return f"{100 * d['mean_diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{other}"

    out = [
        f"Regime `{res['regime']}`: test `{res['design']['test_problems']}`, transfer `{res['design']['transfer_problems']}`.",
        "",
        "| method | seed | avg@4 | greedy | avg@4 - base (95% paired bootstrap) | avg@4 - ReasonMaxxer (95% paired bootstrap) "
        "| greedy - ReasonMaxxer | transfer avg@4 (base) | FLOPs |",
        "|---|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in res["rows"]:
        fl = "-" if r["flops"] is None else f"{r['flops']:.3g}"
        out.append(
            f"| {r['method']} | {r['seed']} | {pct(r['avg_at_4'])} (base {pct(r['base_avg_at_4'])}) | {pct(r['greedy'])} | "
            f"{diff(r.get('avg_at_4_vs_base'))} | {diff(r.get('avg_at_4_vs_reasonmaxxer'), r['seed'])} | "
            f"{diff(r.get('greedy_vs_reasonmaxxer'), r['seed'])} | "
            f"{pct(r['transfer_avg_at_4'])} ({pct(r['transfer_base_avg_at_4'])}) | {fl} |"
        )
    if res["cells_pending"]:
        out += ["", "Cells not run yet: " + ", ".join(res["cells_pending"]) + "."]
    out += ["", "Not in the study yet: " + "; ".join(res["not_in_study_yet"]) + "."]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["method"] for r in res["rows"]}):
        pts = [
            (r["flops"], r["avg_at_4"])
            for r in res["rows"]
            if r["method"] == m and r["flops"] and r["avg_at_4"] is not None
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], label=m)
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

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "method_study.json", res)
    atomic_write_json(RESULTS / "method_study_problems.json", probs)
    atomic_write_bytes(RESULTS / "method_study.md", markdown(res).encode())
    if res["rows"]:
        plot(res, RESULTS / "accuracy_vs_flops.png")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regime", default="short", choices=tuple(REGIMES))
    every = tuple(METHODS) + tuple(BASELINES)
    ap.add_argument("--methods", nargs="+", default=list(every), choices=every)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--baseline-seeds", nargs="+", type=int, default=[0], help="seeds of the GRPO cells")
    ap.add_argument("--root", default=str(ROOT / "runs" / "method_study"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--plan", action="store_true", help="print the cells and which are done; run nothing")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--max-cells", type=int, default=0, help="stop after this many new cells (0: all)")
    a = ap.parse_args(argv)
    root = Path(a.root)
    study = (a.regime, a.seeds, a.methods, a.baseline_seeds)
    todo = cells(*study)
    first = root / a.regime / todo[0]["name"]
    if a.plan:
        carried = stored_cells()
        for c in todo:
            done = finished(c, root / a.regime / c["name"])
            print(f"{'done' if done else 'stored' if stored_name(c) in carried else 'todo'}  {a.regime}/{c['name']}")
        print("not in the study yet:\n  " + "\n  ".join(PENDING))
        return {}
    n_new = 0
    carried = stored_cells()  # finished in an earlier session
    if not a.aggregate_only:
        for c in todo:
            d = root / a.regime / c["name"]
            if finished(c, d) or (stored_name(c) in carried and d != first):
                continue
            if a.max_cells and n_new >= a.max_cells:
                break
            print(f"== cell {a.regime}/{c['name']} ==", flush=True)
            dt = run_cell(c, root, first, a.threads)
            n_new += 1
            print(f"== cell {a.regime}/{c['name']} done in {dt:.0f} s ==", flush=True)
            save(*aggregate(root, *study))
    res, probs = aggregate(root, *study)
    save(res, probs)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
