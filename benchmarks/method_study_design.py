"""The method study's design (issue 13): its regimes, methods, budgets and cells, and the
`reasonmaxxer run` config of each cell. `benchmarks/method_study.py` runs the cells,
`method_study_results.py` aggregates them.

- regime ``long``: the same problems and mix worked at length (``configs/arith_long.toml``, the
  ``verbose`` template), 150 held-out and 60 transfer problems; run with ``--regime long``.
- regime ``short``: the reference run's task (configs/arith.toml, the demo's until issue #13
  halved the demo: procedural arithmetic, 3-shot, <= 96 new tokens), but trained without the
  ``expr`` tier, so that ``arith:test:300:expr`` is a transfer column from a problem family no
  training problem comes from; held-out ``arith:test:300`` of the training mix (avg@4 and
  greedy). All methods share the base evaluation, and the methods that sample alike share the
  rollouts and the selection (`reuse` of the first cell of their sampling: see `reuse_source`).
- methods: ``reasonmaxxer`` (the reference run's recipe), ``rft`` (SFT on the correct rollouts),
  ``positive_only`` (the paper's: loss variant ``positive_only_paper``), ``random_gate`` (the entropy gate's count at random positions),
  ``all_tokens``, ``no_anchor``; seeds 0, 1, 2 (the training seed: under the reference run's
  ``order = "clarity"`` only the LoRA initialisation, and the random gate's draws; rollouts,
  selection and order fixed).
- ``random_reward``: the random-reward control, ReasonMaxxer on the same rollouts with their
  correctness labels permuted across the pool (``[selection] rewards = "shuffled"``); its seed is
  also the permutation's (``[selection] seed``: before 2026-12-07 every seed had permutation 0).
- data replicates (``--data-seeds``, default 1 2, with seed 0 selected): ``reasonmaxxer``,
  ``rft``, ``positive_only`` and ``random_reward`` at training seed 0 on rollouts sampled afresh
  (the regime's sampling seed + k; the others on ReasonMaxxer's of the same k), rows
  ``reasonmaxxer.d1`` ...: what a fresh sample of the data moves, which a training seed (the LoRA
  initialisation) does not.
- ``faithful``: the official recipe's choices at this scale (G = 16 rollouts per problem, 50
  problems, the 80% trim with truncated rollouts counted wrong, unmixed groups kept,
  per-sequence normalisation, lr 1e-4 with warmup); its seed-0 cell samples its own rollouts,
  its other seeds reuse them.
- budgets: every method at 1x, 2x and 4x the FLOPs of ReasonMaxxer seed 0 (counted as
  `reasonmaxxer compare` counts them). ``grpo`` and ``grpo_entropy`` (80/20 gated GRPO, TRL
  through `reasonmaxxer baseline`): one run per seed capped at 4x and evaluated where its counted
  FLOPs first reach 1x and 2x (TRL's learning rate is constant, so the model there is what a run
  capped there would give). The offline methods ``reasonmaxxer`` and ``rft`` spend a larger
  budget the way an offline method can: the same recipe on 2x / 4x the training problems
  (``arith:train:160`` / ``:320``, which begin with the 1x problems), so sampling and training
  both scale; rows ``reasonmaxxer@2x`` ..., seed 0 (``--budget-seeds``), FLOPs as measured.

Across sessions (``runs/`` is not committed): what the other cells take from the first cell (its
base rollouts, base evaluation, transfer base evaluation, run config and timings) is copied, once
it finishes, to ``benchmarks/results/method_study_base/<regime>/`` (the regime's *base pack*;
commit it, ~1 MB). A later session's cells reuse the pack instead of re-running the first cell
(45-60 min), so every cell of a regime, whatever the session or the CPU it ran on, is paired with
the same base rollouts and the same base evaluation (`base_source`).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# what the other cells read from the first cell (paths relative to its run dir; `transfer_base`
# is the regime's shared transfer evaluation, beside the cells)
PACK_FILES = ("run_config.json", "timings.json", "rollouts", "eval/base/samples", "eval/base/greedy")
TRAIN_TIERS = "add1,addsub2,word1,word2"  # the default mix without expr (the transfer family)
REGIMES = {
    "short": {
        "extends": str(ROOT / "configs" / "arith.toml"),
        "train_problems": f"arith:train:80:{TRAIN_TIERS}",
        "validation_problems": f"arith:validation:32:{TRAIN_TIERS}",
        "test_problems": f"arith:test:300:{TRAIN_TIERS}",
        "transfer_problems": "arith:test:300:expr",
    },
    # the same problems worked at length (configs/arith_long.toml: the `verbose` template, <= 192
    # new tokens): base completions average ~90 tokens instead of ~26, so the forks are a smaller
    # share of each solution. 150 held-out problems and 60 transfer ones (each token costs 3.5x,
    # and a session must finish a cell: ReasonMaxxer seed 0 took ~65 min on 2 threads)
    "long": {
        "extends": str(ROOT / "configs" / "arith_long.toml"),
        "train_problems": f"arith:train:80:{TRAIN_TIERS}",
        "validation_problems": f"arith:validation:32:{TRAIN_TIERS}",
        "test_problems": f"arith:test:150:{TRAIN_TIERS}",
        "transfer_problems": "arith:test:60:expr",
    },
}
METHODS = {
    "reasonmaxxer": {},
    "rft": {"train": {"variant": "rft"}},
    # the "positive-only (paper)": the official --positive_only (incorrect rollouts
    # dropped, A = 1 on the correct ones), not our variant that keeps the A > 0 values
    "positive_only": {"train": {"variant": "positive_only_paper"}},
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
# a GRPO cell's keys beyond the regime's problems, prompt and lengths. `long`: the 16 completions
# of a step (prompts ~540 tokens + up to 192 new) in 4 micro-batches of 4; in one batch of 16 the
# first step's process grew past 23 GB and was OOM-killed on the 2-core dev machine. Gradient
# accumulation changes the memory, not the update (up to float summation order): TRL generates
# the step's 16 completions at once, its "dapo" loss divides every micro-batch by the whole
# generation batch's token count (trl 1.16 grpo_trainer.py l. 3168-3172) and the Trainer does not
# divide again (`loss_is_scaled_for_ga = True`, l. 285). Not so for `grpo_entropy`: TRL takes
# its 80th-percentile entropy threshold over each micro-batch (`get_high_entropy_mask`,
# l. 1380-1416), here 4 completions instead of the short regime's 16
BASELINE_KEYS = {"short": {}, "long": {"grad_accum": 4}}
# RL through TRL: study method -> `reasonmaxxer baseline` method
BASELINES = {"grpo": "grpo", "grpo_entropy": "grpo-entropy"}
SEEDS = (0, 1, 2)  # the training seeds of the 1x cells (`--seeds` default)
BUDGETS = (1, 2, 4)  # x the FLOPs of ReasonMaxxer seed 0
BUDGET_METHODS = ("reasonmaxxer", "rft")  # the offline methods also run on 2x / 4x the problems
# data replicates: ReasonMaxxer, RFT and the two ablations that decide a reading (training seed 0)
# on rollouts sampled afresh with sampling seed (the regime's) + k, the others on ReasonMaxxer's of
# the same k: cells "reasonmaxxer.d1-s0" ... (a training seed changes only the LoRA
# initialisation; these change the data). In `long`, ReasonMaxxer's gain moved +5.7 / -1.5 / +2.7
# over three samples of rollouts while RFT's held (+9.2 / +11.0 / +8.2): positive-only asks
# whether the negative term is what is unstable, random rewards whether the labels still carry it
DATA_METHODS = ("reasonmaxxer", "rft", "positive_only", "random_reward")
DATA_SEEDS = (1, 2)  # `--data-seeds` default
# run first, in this order ("budgets": the offline methods' 2x and 4x cells)
ORDER = ("reasonmaxxer", "rft", "random_reward", "grpo", "budgets", "data", "faithful", "grpo_entropy")
# what the design leaves out, said under each table
PENDING = [
    "completions >= 100 tokens on average: the embedded default solves multi-step problems too rarely "
    "(the `long` regime's completions average ~90 tokens; running-total chains of 6-8 steps: 0-6% pass)"
]


def cells(regime: str, seeds, methods, baseline_seeds=(0,), budget_seeds=(0,), data_seeds=()) -> list[dict]:
    """The study's cells in run order: ReasonMaxxer seed 0 first (its base stores are reused), in
    every selection: `--methods positive_only` alone still starts from it (or from its base pack),
    so no other cell ever becomes the one whose stores the others copy.
    The offline 2x/4x cells run for the `budget_seeds` that are in `seeds`; the GRPO cells for
    `baseline_seeds` (GRPO has no 1x seeds to select); the data replicates (`DATA_METHODS`) for
    `data_seeds` when seed 0 is selected.
    A cell: regime, method, seed, budget (x the training problems, hence about x the reference
    FLOPs: 2 and 4 for the offline 2x/4x cells, else 1; a GRPO cell is 1 and capped at
    `BUDGETS[-1]` x the reference FLOPs, its rows evaluated at each of `BUDGETS`), data (0, or its data replicate k), label (the row's method: "rft",
    "rft@2x", "rft.d1") and name (its run dir)."""
    out = [] if "reasonmaxxer" in methods and 0 in seeds else [_cell(regime, "reasonmaxxer", 0, 1, "reasonmaxxer")]
    for m in methods:
        if m in BASELINES:
            out += [_cell(regime, m, s, 1, m) for s in baseline_seeds]
            continue
        out += [_cell(regime, m, s, 1, m) for s in seeds]
        if m in BUDGET_METHODS:
            # a budget cell runs for a budget seed that is also selected: `--seeds 1` is seed 1's
            # cells only, not seed 0's 2x/4x cells besides
            out += [_cell(regime, m, s, b, f"{m}@{b}x") for b in BUDGETS[1:] for s in budget_seeds if s in seeds]
        if m in DATA_METHODS and 0 in seeds:
            out += [_cell(regime, m, 0, 1, f"{m}.d{k}", data=k) for k in data_seeds]
    # ReasonMaxxer seed 0 first (the others reuse its base stores), then ReasonMaxxer and RFT
    # over the seeds (the comparison the study must decide), then the rest of ORDER, then the
    # ablations
    rank = {m: i for i, m in enumerate(ORDER)}

    def key(c):
        group = "budgets" if c["budget"] > 1 else "data" if c["data"] else c["method"]
        first = c["seed"] == 0 and c["method"] == "reasonmaxxer" and c["budget"] == 1 and not c["data"]
        method = rank.get(c["method"], len(ORDER))  # a replicate's ablation after ReasonMaxxer's of its k
        return (not first, rank.get(group, len(ORDER)), c["budget"], c["data"], method, c["seed"])

    return sorted({c["name"]: c for c in out}.values(), key=key)  # a seed given twice: its cells once


def _cell(regime: str, method: str, seed: int, budget: int, label: str, data: int = 0) -> dict:
    return {
        "regime": regime,
        "method": method,
        "seed": seed,
        "budget": budget,
        "data": data,
        "label": label,
        "name": f"{label}-s{seed}",
    }


def cell_dir(cell: dict, root: Path) -> Path:
    """A cell's run dir under the study's `root`: ``root/<regime>/<name>``."""
    return root / cell["regime"] / cell["name"]


def cell_log(cell: dict, root: Path) -> Path:
    """A cell's log beside its run dir (cells run with `--jobs` > 1): ``root/<regime>/<name>.log``."""
    return root / cell["regime"] / f"{cell['name']}.log"


def finished(cell: dict, d: Path) -> bool:
    """Whether the cell's run dir `d` holds a finished run (`run`'s summary, `baseline`'s result)."""
    return (d / ("result.json" if cell["method"] in BASELINES else "summary.json")).is_file()


def done(cell: dict, d: Path) -> bool:
    """Whether the cell is complete: its run finished and its transfer column evaluated, the
    trained model's and the base's (shared by the regime's cells, beside them); a cell stopped
    before both are there is resumed at the transfer evaluation, its run not repeated."""
    transfer = (d / "transfer" / "eval.json", d.parent / "transfer_base" / "eval.json")
    return finished(cell, d) and all(p.is_file() for p in transfer)


def pack_dir(regime: str) -> Path:
    """The regime's base pack (committed): what the other cells take from the first cell."""
    return RESULTS / "method_study_base" / regime


def base_source(regime: str, first_cell: dict, first: Path, carried: set[str]) -> Path:
    """Where the cells of `regime` take the first cell's stores from: its run dir `first` when it
    is there, finished or to be run; the base pack when the first cell's results are committed
    (`carried`) and its dir is not here (a later session), so it is not re-run."""
    if first.is_dir() or stored_name(first_cell) not in carried or not (pack_dir(regime) / "run_config.json").is_file():
        return first
    return pack_dir(regime)


def stored_name(cell: dict) -> str:
    """The name under which a cell's (last) row is stored: "rft-s2", "rft@2x-s0", "grpo@4x-s0"."""
    return f"{cell['method']}@{BUDGETS[-1]}x-s{cell['seed']}" if cell["method"] in BASELINES else cell["name"]


def scaled_problems(spec: str, factor: int) -> str:
    """A ``source:split:N[:...]`` problem spec with N multiplied by `factor`."""
    parts = spec.split(":")
    if len(parts) < 3 or not parts[2].isdigit():
        raise SystemExit(f"method_study: cannot scale the problem spec {spec!r} (expected source:split:N[:...])")
    parts[2] = str(int(parts[2]) * factor)
    return ":".join(parts)


def sampling_sibling(cell: dict, root: Path) -> Path | None:
    """The run dir of the first cell that samples as `cell` does (faithful's seed 0, the
    ReasonMaxxer cell of its budget or data replicate), whose stores it copies; None when that is
    the study's first cell (or `cell` itself), and for a GRPO cell. `method_study.run_cells`
    starts no cell before its sibling is done."""
    d = root / cell["regime"]
    if cell["method"] in BASELINES:  # RL samples its own completions as it trains: it copies no store
        return None
    if cell["budget"] > 1:
        src = d / f"reasonmaxxer@{cell['budget']}x-s0"
    elif cell["data"]:
        src = d / f"reasonmaxxer.d{cell['data']}-s0"
    elif "sampling" in METHODS[cell["method"]]:
        src = d / f"{cell['method']}-s0"
    else:
        return None
    return None if src == cell_dir(cell, root) else src


def reuse_source(cell: dict, root: Path, first: Path) -> Path | None:
    """The run dir whose stores (rollouts, base evaluation) a cell copies where they were made
    with the same inputs: its `sampling_sibling` while that dir is here, else the study's first
    cell (`first`: its run dir or the regime's base pack); None for the first cell."""
    src = sampling_sibling(cell, root)
    # the first of its sampling, or one whose dir is gone (run in an earlier session): the first
    # cell's base evaluation only (the rollouts are sampled again, with the same sampling seed)
    src = first if src is None or not src.is_dir() else src
    return None if cell_dir(cell, root) == first else src


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def baseline_cell_config(ev: dict, regime: str) -> str:
    """The TOML of a GRPO cell's `--config`: the regime's `BASELINE_KEYS` and `ev`, the first
    cell's [eval] table (samples, temperature, length, seed, ...: its run_config.json's), so GRPO
    is evaluated exactly as the ReasonMaxxer cells are (the rest comes as flags: `run_baseline_cell`)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in BASELINE_KEYS[regime].items()]
    return "\n".join(lines + ["[eval]"] + [f"{k} = {toml_value(v)}" for k, v in ev.items()]) + "\n"


def cell_config(cell: dict, root: Path, first: Path) -> str:
    """The TOML of one cell: the regime over the reference run (arith.toml), the method's
    overrides, the budget's training problems, the seed, and what it reuses."""
    reg = REGIMES[cell["regime"]]
    top = {k: v for k, v in reg.items() if k != "transfer_problems"}
    top["train_problems"] = scaled_problems(reg["train_problems"], cell["budget"])
    top["out"] = str(cell_dir(cell, root))
    src = reuse_source(cell, root, first)
    if src is not None:
        top["reuse"] = str(src)
    tables = {"eval": {"n": 4}, "train": {"seed": cell["seed"]}}
    if cell["method"] == "random_reward":  # each seed its own permutation of the labels
        tables["selection"] = {"seed": cell["seed"]}
    if cell["data"]:  # rollouts sampled afresh: the regime's sampling seed + k
        from reasonmaxxer.config import load_run_config

        tables["sampling"] = {"seed": load_run_config(reg["extends"]).sampling.seed + cell["data"]}
    for t, kv in METHODS[cell["method"]].items():
        tables.setdefault(t, {}).update(kv)
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for t, kv in tables.items():
        lines += ["", f"[{t}]"] + [f"{k} = {toml_value(v)}" for k, v in kv.items()]
    return "\n".join(lines) + "\n"
