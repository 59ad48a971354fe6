"""Compute-to-match: ReasonMaxxer vs RL baselines (TRL) on the embedded default, side by side.

    python benchmarks/compute_to_match.py                         # grpo, cap = 20x ReasonMaxxer
    python benchmarks/compute_to_match.py --methods grpo grpo-entropy --factor 20 --threads 1

1. The ReasonMaxxer reference: the reference recipe (configs/arith.toml) run into OUT/reasonmaxxer
   with the same thread count as the baselines (a no-op when already done). Its compute is
   its own work: sampling + scoring + training (with checkpoint validation), not its evaluation.
2. Each RL baseline through TRL on the same model, training problems, prompt template, grader,
   LoRA rank and held-out evaluation, until its training wall-clock reaches
   FACTOR x ReasonMaxxer's (the cap), evaluated every --eval-every steps.
3. `compare`: the table, the accuracy-vs-compute plot, and compute-to-match (FLOPs and
   wall-clock). When a baseline never reaches ReasonMaxxer's held-out accuracy, the honest
   figure is a lower bound: cap / ReasonMaxxer's wall-clock (">= x").

Long: with the default factor 20 each baseline trains ~95 min on 2 cores, plus its
evaluations. Run it in the background; it resumes where it stopped when re-run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from reasonmaxxer.config import load_run_config
from reasonmaxxer.recipes.baselines import BaselineConfig, run_baseline
from reasonmaxxer.recipes.compare import run_compare
from reasonmaxxer.recipes.run import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["grpo"], choices=["grpo", "grpo-entropy", "dr-grpo", "rloo"])
    ap.add_argument("--factor", type=float, default=20.0, help="RL training cap = factor x ReasonMaxxer's wall-clock")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for every run (the same for all)")
    ap.add_argument("--eval-every", type=int, default=15, help="held-out evaluation every N RL steps")
    ap.add_argument("--config", default=str(ROOT / "reasonmaxxer" / "configs" / "arith.toml"))
    ap.add_argument("--out", default="runs/compute_to_match")
    ap.add_argument("--metric", default="avg_at_n", choices=["avg_at_n", "greedy"])
    ap.add_argument(
        "--reference",
        default=None,
        help="an existing ReasonMaxxer run dir of --config (e.g. runs/arith) to use instead of running it",
    )
    a = ap.parse_args()
    out = Path(a.out)

    rm_dir = Path(a.reference) if a.reference else out / "reasonmaxxer"
    cfg = load_run_config(a.config, out=str(rm_dir), threads=a.threads)
    t0 = time.time()
    if not a.reference:
        run_pipeline(cfg)
    timings = json.loads((rm_dir / "timings.json").read_text())
    rm_seconds = sum(timings.get(k, 0.0) for k in ("sample", "select + score", "train"))
    cap = a.factor * rm_seconds
    print(
        f"\nReasonMaxxer reference: {rm_seconds:.0f} s of sampling + scoring + training "
        f"({time.time() - t0:.0f} s this call); RL cap = {a.factor:g} x = {cap:.0f} s of training each",
        flush=True,
    )

    dirs = [str(rm_dir)]
    for m in a.methods:
        bcfg = BaselineConfig(
            method=m,
            out=str(out / m),
            model=cfg.model,
            template=cfg.template,
            train_problems=cfg.train_problems,
            test_problems=cfg.test_problems,
            data_dir=cfg.data_dir,
            max_new_tokens=cfg.sampling.max_new_tokens,
            temperature=cfg.sampling.temperature,
            lora_rank=cfg.train.lora_rank,
            lora_alpha=cfg.train.lora_alpha,
            target_modules=cfg.train.target_modules,
            max_steps=100_000,
            max_train_seconds=cap,
            eval_every=a.eval_every,
            eval=replace(cfg.eval),
            threads=a.threads,
        )
        t1 = time.time()
        res = run_baseline(bcfg)
        print(
            f"{m}: {res['steps']} steps, {res['train_seconds']:.0f} s training + {res['eval_seconds']:.0f} s "
            f"held-out evaluation ({time.time() - t1:.0f} s this call)",
            flush=True,
        )
        dirs.append(str(out / m))

    md = run_compare(dirs, out / "compare", reference=str(rm_dir), metric=a.metric)
    print("\n" + md)
    c = json.loads((out / "compare" / "compare.json").read_text())
    ref = c["rows"][0]
    rl = [r for r in c["rows"] if r["kind"] == "baseline"]
    best = max(rl, key=lambda r: r.get(a.metric) or 0.0)
    ctm = best["compute_to_match"]
    bound = ">=" if ctm["lower_bound"] else "="
    print(
        f"ReasonMaxxer held-out {a.metric} {ref[a.metric]:.3f} vs best RL baseline ({best['method']}) "
        f"{best[a.metric]:.3f}"
    )
    print(
        f"compute-to-match of {best['method']}: FLOPs ratio {bound} {ctm['flops_ratio']:.1f}x, "
        f"wall-clock ratio {bound} {ctm['wall_ratio']:.1f}x "
        f"({'reached' if ctm['reached'] else 'not reached within the cap'})"
    )
    goal = ref[a.metric] >= best[a.metric] and (ctm["wall_ratio"] or 0) >= 20
    print(f"goal (ReasonMaxxer >= best RL accuracy at >= 20x less compute, wall-clock): {'MET' if goal else 'NOT MET'}")


if __name__ == "__main__":
    main()
