"""The summary of a `recipes.run` pipeline run: paired per-problem accuracy, the report's tables
(by tier/subject, most-changed forks), the summary dict behind report.md/html and summary.json,
and the end of a run (reports written, model card filled, adapter pushed, result printed).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..io import atomic_write_json, read_jsonl
from ..store import RolloutStore


def per_problem_accuracy(store: RolloutStore, col: str = "strict_correct") -> dict[str, float]:
    """{problem id: mean of `col` (a correctness flag; a missing grade counts as wrong)} over a
    graded rollout store's rows."""
    acc: dict[str, list] = {}
    for r in store.read_rows(["problem_id", col]):
        acc.setdefault(r["problem_id"], []).append(float(bool(r[col])))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def tier_table(problems, stores: dict) -> dict | None:
    """Per-tier (or subject) base vs trained accuracy and format-following, from the eval stores."""
    key = next((k for k in ("tier", "subject", "source") if any(k in p.metadata for p in problems)), None)
    if key is None:
        return None
    group = {p.id: str(p.metadata.get(key, "(missing)")) for p in problems}
    rows_by = {}
    for name, (s_store, g_store) in stores.items():
        for label, st in (("greedy", g_store), ("avg", s_store)):
            if st is None:
                continue
            for r in st.read_rows(["problem_id", "strict_correct", "strict_extracted"]):
                d = rows_by.setdefault(group[r["problem_id"]], {}).setdefault((name, label), [0, 0, 0])
                d[0] += int(r["strict_correct"])
                d[1] += 1
                d[2] += int(r["strict_extracted"] is not None)
    rows = []
    for g in sorted(rows_by):
        d = rows_by[g]
        f = lambda n, l, i=0, d=d: f"{d[(n, l)][i] / d[(n, l)][1]:.3f}" if (n, l) in d else "-"
        n_prob = sum(1 for v in group.values() if v == g)
        rows.append(
            [
                g,
                n_prob,
                f("base", "greedy"),
                f("trained", "greedy"),
                f("base", "avg"),
                f("trained", "avg"),
                f("base", "greedy", 2),
                f("trained", "greedy", 2),
            ]
        )
    return {
        "title": f"Held-out accuracy by {key} (strict); 'answer given' = greedy completions with a \\boxed{{}} or "
        f"'The answer is' answer (format followed)",
        "header": [
            key,
            "problems",
            "greedy base",
            "greedy trained",
            "avg@n base",
            "avg@n trained",
            "answer given base",
            "answer given trained",
        ],
        "rows": rows,
    }


def paired_accuracy(stores: dict) -> dict:
    """Paired per-problem differences trained - base, greedy and avg@n (`core.stats.paired_difference`)."""
    from ..core.stats import paired_difference

    paired = {}
    for metric, idx in (("greedy", 1), ("avg_at_n", 0)):
        a, b = stores["trained"][idx], stores["base"][idx]
        if a is not None and b is not None:
            paired[metric] = paired_difference(per_problem_accuracy(a), per_problem_accuracy(b))
    return paired


def fork_table(fc: dict) -> dict:
    """The report's "most-changed forks" table from `analysis.forks.fork_changes`."""
    return {
        "title": (
            f"Most-changed forks: on {fc['positions']} completion tokens of training rollouts (teacher-forced), the "
            f"trained argmax differs from the base at {fc['changed_fraction']:.2%} of positions; "
            f"{fc['changed_in_base_top5']}/{fc['changed']} of the new tokens are in the base top-5; "
            f"{fc['changed_at_gated']}/{fc['changed']} sit at gated positions; mean base entropy "
            f"{fc['mean_entropy_changed']:.2f} nats at changed vs {fc['mean_entropy_unchanged']:.2f} at unchanged positions."
        ),
        "header": ["base argmax", "trained argmax", "count", "mean base entropy (nats)"],
        "rows": [
            [repr(r["base"]), repr(r["tuned"]), r["count"], f"{r['mean_base_entropy']:.2f}"] for r in fc["most_common"]
        ],
    }


def build_summary(cfg: RunConfig, res, reports, paired, score_info, sel, fc, tables, timings) -> dict:
    """The run's summary (report.md/html and, without the bulky parts, summary.json)."""

    def acc(rep):
        return {
            "avg_at_n": rep.strict.avg_at_n.value if cfg.eval.n > 0 else None,
            "greedy": rep.strict.greedy.value if rep.strict.greedy else None,
            "n_problems": rep.n_problems,
            "n_samples": cfg.eval.n,
            "mean_tokens": None if rep.mean_tokens is None else round(rep.mean_tokens, 2),
        }

    key = "greedy" if "greedy" in paired else "avg_at_n"
    out = Path(cfg.out)
    return {
        "title": f"ReasonMaxxer run: {cfg.model}",
        "summary": {
            "model": cfg.model,
            "train problems": cfg.train_problems,
            "test problems": cfg.test_problems,
            "template": cfg.template,
            "method": cfg.train.variant,
            "gate": cfg.train.gate,
            "lam": cfg.train.lam,
            "tau": round(res["tau"], 4),
            "tau_source": (
                f"calibrated: best validation accuracy of {list(cfg.calibrate.taus)} (calibrate/calibrate.md)"
                if cfg.calibrate.taus
                else res["tau_source"]
            ),
            "steps": res["total_steps"],
            "selected step": res["selected_step"],
            "selected val accuracy": res["selected_val_accuracy"],
            "entropies": "reused from the sampler" if score_info.get("reused_sampler_entropies") else "scored",
        },
        "accuracy": {
            "base": acc(reports["base"]),
            "trained": acc(reports["trained"]),
            "paired": {"metric": key, **paired.get(key, {})},
            "paired_all": paired,
        },
        "entropy": {"values": [], "tau": res["tau"], "gated_fraction": res["gated_fraction"]},
        "examples": [],
        "curves": [r for _, r in read_jsonl(out / "train" / "metrics.jsonl", allow_empty=True)],
        "timings": timings,
        "tables": tables,
        "fork_changes": fc,
        "selection": dict(sel.stats),
        "artifacts": {
            "adapter": "train/adapter",
            "merged": "train/merged",
            "rollouts": "rollouts",
            "eval base": "eval/base/eval.md",
            "eval trained": "eval/trained/eval.md",
            "metrics": "train/metrics.jsonl",
        },
    }


def finish_run(cfg: RunConfig, out: Path, summary: dict, paired: dict, res: dict, progress: bool) -> dict:
    """Write report.md/html and summary.json, fill the model card's held-out table, push the
    adapter when asked, print the result. Returns summary.json's dict."""
    from ..reports.run_report import write_train_report
    from ..stages.publish import push_adapter

    md, html = write_train_report(out, summary)
    small = {k: v for k, v in summary.items() if k not in ("entropy", "examples", "curves", "tables")}
    small["entropy"] = {
        "tau": res["tau"],
        "gated_fraction": res["gated_fraction"],
        "n_tokens": len(summary["entropy"]["values"]),
    }
    atomic_write_json(out / "summary.json", small)
    adapter = out / "train" / "adapter"
    if (adapter / "adapter_config.json").is_file():  # the model card gets the held-out figures
        from ..stages.checkpoint import write_model_card

        run_info = [json.loads((out / "train" / f).read_text()) for f in ("train_config.json", "result.json")]
        write_model_card(adapter, *run_info, results_markdown(small["accuracy"], cfg.test_problems))
    if cfg.push_to_hub:  # after the card has the held-out results
        print(f"pushed {adapter} to {push_adapter(adapter, cfg.push_to_hub)}", flush=True)
    if progress:
        print_result(small, paired, res["tau"], res["gated_fraction"], md, html)
    return small


def results_markdown(accuracy: dict, test_problems: str) -> str:
    """The held-out table of a run's summary, for the model card: base, trained, paired diff."""
    rows = [
        f"On `{test_problems}` ({accuracy['base']['n_problems']} problems), strict grading; paired difference "
        "over problems with its 95% interval.",
        "",
        "| metric | base | trained | paired difference (95% CI) |",
        "|---|---|---|---|",
    ]
    for metric in ("greedy", "avg_at_n"):
        b, t = accuracy["base"].get(metric), accuracy["trained"].get(metric)
        if b is None:
            continue
        p = accuracy["paired_all"].get(metric) or {}
        diff = f"{p['mean_diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]" if p else "-"
        name = f"avg@{accuracy['base']['n_samples']}" if metric == "avg_at_n" else metric
        rows.append(f"| {name} | {b:.3f} | {t:.3f} | {diff} |")
    b, t = accuracy["base"].get("mean_tokens"), accuracy["trained"].get("mean_tokens")
    if b is not None and t is not None:
        rows.append(f"| completion tokens (mean) | {b:.1f} | {t:.1f} | - |")
    return "\n".join(rows) + "\n"


def print_result(small: dict, paired: dict, tau: float, gated_fraction: float, md, html) -> None:
    print("\n== result (held-out, same problems) ==")
    b, t = small["accuracy"]["base"], small["accuracy"]["trained"]
    for metric in ("greedy", "avg_at_n"):
        if b.get(metric) is not None:
            p = paired.get(metric, {})
            ci = (
                f" (paired diff {p['mean_diff']:+.3f}, 95% CI [{p['low']:+.3f}, {p['high']:+.3f}], n={p['n']})"
                if p
                else ""
            )
            print(f"{metric:9s} base {b[metric]:.3f} -> trained {t[metric]:.3f}{ci}")
    if b.get("mean_tokens") is not None and t.get("mean_tokens") is not None:
        print(f"length    base {b['mean_tokens']:.1f} -> trained {t['mean_tokens']:.1f} completion tokens (mean)")
    print(f"tau {tau:.3f} nats, gated fraction {gated_fraction:.2%}; report: {md} , {html}")
