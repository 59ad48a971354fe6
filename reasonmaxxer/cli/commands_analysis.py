"""Commands that look inside a tuned model: `analyze` (and its --delta), `distill`, `intervene`."""

from __future__ import annotations

from pathlib import Path

from ..errors import ReasonMaxxerError
from .options import set_threads


def cmd_analyze(a):
    """`analyze`: token-level comparison of --tuned with --base, or with --delta the weight change's spectrum."""
    from ..analysis.tokens import run_analyze

    set_threads(a)
    if a.delta:
        return cmd_delta(a)
    if not a.tuned:
        raise ReasonMaxxerError("analyze: pass --tuned MODEL (token-level comparison) or --delta ADAPTER (spectrum)")
    res = run_analyze(
        a.base,
        a.tuned,
        a.problems,
        a.out,
        template=a.template,
        limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        data_dir=a.data_dir,
        trajectories=a.trajectories,
    )
    from ..reports.explorer import analysis_plots, write_explorer, write_fork_atlas

    analysis_plots(a.out)
    write_explorer(a.out)
    try:
        write_fork_atlas(a.out)
        atlas = ", fork_atlas.html"
    except ReasonMaxxerError as e:  # e.g. no reranked position at all: nothing to build an atlas from
        atlas = f" (no fork atlas: {e})"
    print((Path(a.out) / "analysis.md").read_text())
    print(f"written: {a.out}/analysis.json, analysis.md, trajectories.jsonl, explorer.html, plots/{atlas}")
    return res


def cmd_delta(a):
    """`analyze --delta`: the effective ranks of a weight change."""
    from ..analysis.delta import run_delta

    res = run_delta(a.delta, a.out, base=a.base)  # --base: read for a full fine-tune only
    for mod, v in res["summary"].items():
        print(f"{mod}: {v['n']} modules, effective rank 90% mean {v['mean_rank_90']:.1f} (max {v['max_rank_90']}), "
              f"99% mean {v['mean_rank_99']:.1f} (max {v['max_rank_99']})")  # fmt: skip
    print(f"written: {a.out}/delta.json, delta.png")
    return res


def cmd_distill(a):
    """`distill`: a rank sweep of KL-LoRA students of --teacher."""
    from ..recipes.distill import run_distill
    from ..stages.distill import DistillConfig

    set_threads(a)
    keys = ("positions", "lr", "epochs", "max_steps", "micro_batch", "grad_accum", "seed", "alpha_per_rank")
    cfg = DistillConfig(**{k: getattr(a, k) for k in keys if getattr(a, k) is not None})
    res = run_distill(
        a.teacher, a.base, a.ranks, a.problems, a.out, cfg=cfg, rollouts=a.rollouts, test_problems=a.test_problems,
        template=a.template, data_dir=a.data_dir, limit=a.limit, n=a.n, max_new_tokens=a.max_new_tokens,
        eval_n=a.eval_n, heldout_rollouts=a.heldout_rollouts, progress=True,
    )  # fmt: skip
    print((Path(a.out) / "distill.md").read_text())
    print(f"written: {a.out}/distill.json, distill.md, recovery_vs_rank.png, rank-*/")
    return res


def cmd_intervene(a):
    """`intervene`: causal checks of where the tuned model's changes matter."""
    from ..analysis.intervene import run_intervene

    set_threads(a)
    run_intervene(
        a.base,
        a.tuned,
        a.problems,
        a.out,
        template=a.template,
        limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        taus=tuple(a.taus),
        random_seeds=tuple(range(a.random_seeds)),
        js_eps=a.js_eps,
        data_dir=a.data_dir,
    )
    print((Path(a.out) / "intervene.md").read_text())
    print(f"written: {a.out}/intervene.json, intervene.md, intervene_bars.png, tau_sweep.png")
