#!/usr/bin/env bash
# Issue #15 item 4: how many LoRA dimensions does each tuned adapter of the embedded default
# need? Distil the reference run's ReasonMaxxer adapter (configs/arith.toml, the demo's recipe
# until issue #13), the RFT ablation's and a GRPO baseline's into LoRA students at ranks 1-32 and copy each table to benchmarks/results/distill/<teacher>.{json,md}.
#
#   bash benchmarks/distill_sweep.sh [teacher ...]     # default: arith rft grpo, in that order
#   THREADS=2 bash benchmarks/distill_sweep.sh grpo    # the machine to itself: torch threads (default 1)
#
# Resumable: every step is a run dir that is skipped (or resumed) when re-run; a teacher's
# table is copied as soon as its sweep ends. Long: 20-35 min per rank, ~3 h per teacher on one
# core of a 2-core machine shared with another job (GRPO's own 20 steps ~1.5 h more); `THREADS=2` with
# the machine (mostly) to itself: grpo in 2 h 27 min in all.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${REASONMAXXER:-.venv/bin/reasonmaxxer}
RES=benchmarks/results/distill
T=${THREADS:-1}
mkdir -p "$RES"
COMMON=(--base smollm2-135m --ranks 1 2 4 8 16 32 --problems arith:train:80 --test-problems arith:test:96
        --template fewshot --n 4 --eval-n 4 --max-new-tokens 96 --epochs 2 --threads "$T")

teacher_dir() {
  case "$1" in
    arith) $R run configs/arith.toml >/dev/null; echo runs/arith/train/adapter ;;
    # the RFT ablation reuses the reference run's rollouts (runs/arith)
    rft) $R run configs/arith.toml >/dev/null; $R run configs/ablations/rft.toml >/dev/null; echo runs/ablation-rft/train/adapter ;;
    # GRPO (TRL) for 20 steps of 4 prompts x 4 generations (~1.2x the reference run's FLOPs:
    # GRPO reached its avg@4 at step 18 in the README's compute-to-match run), evaluated once at the end.
    grpo) $R baseline grpo --max-steps 20 --eval-every 0 --threads "$T" --out runs/baseline-grpo >/dev/null
          echo runs/baseline-grpo/adapter ;;
    *) echo "unknown teacher $1 (arith, rft, grpo)" >&2; exit 2 ;;
  esac
}

for t in "${@:-arith rft grpo}"; do
  for name in $t; do
    dir=$(teacher_dir "$name")
    $R distill --teacher "$dir" "${COMMON[@]}" --out "runs/distill/$name"
    $R analyze --delta "$dir" --out "runs/delta/$name"
    cp "runs/distill/$name/distill.json" "$RES/$name.json"
    cp "runs/distill/$name/distill.md" "$RES/$name.md"
    cp "runs/distill/$name/recovery_vs_rank.png" "$RES/${name}_recovery_vs_rank.png"
    cp "runs/delta/$name/delta.json" "$RES/${name}_delta.json"
    echo "[distill_sweep] $name done: $RES/$name.md"
  done
done
