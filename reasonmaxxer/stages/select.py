"""Training-set selection: which sampled rollouts ReasonMaxxer trains on (method.md section 3, Data 1-4).

From the graded rollouts of the frozen base model (G samples per problem):

1. Truncation policy (`SelectionConfig.truncated`), applied before any pass rate:
   ``"drop"`` removes truncated rollouts; ``"mask"`` keeps them with reward 0 and
   ``mask_decision=True`` so the loss can leave their decision term out; ``"keep"``
   keeps them as graded.
2. Pass rate per problem = correct / rollouts (after step 1). Only problems with mixed
   success (0 < pass rate < 1) carry a learning signal: a group whose rewards are all
   equal has advantage 0 everywhere.
3. Rank the mixed problems by |pass rate - 0.5| ascending (the official recipe), ties
   broken by fewer truncated rollouts, then shorter mean completion length, then
   problem_id; keep the first ``max_problems`` (paper: 50 problems -> 1000 sequences at
   G=20). The ranking key is computed exactly (fractions), so 3/10 and 7/10 tie.
4. ``keep_shortest < 1`` (official recipe: 0.8): keep that fraction of the selected
   rollouts, shortest completions first, GLOBALLY over all selected problems (ties by
   problem_id, sample_index; the count is round-half-up). A problem whose surviving
   rollouts no longer have mixed rewards (including one left with a single rollout) is
   then dropped (``keep_unmixed=False``, the default) or kept with advantage 0 on every
   rollout, training the anchor only (``keep_unmixed=True``, the official recipe's: its
   prepare_training_data.py keeps every problem of the trimmed file, ``--min_pass 0.0
   --max_pass 1.0``, and an all-equal group gets (r - mean) / eps = 0, OFFICIAL
   examples/qwen25_1p5b/04_train_tau1p4.sh:11, scripts/prepare_training_data.py:35-41,68,
   212-214,257); a dropped problem's place is NOT back-filled by the next-ranked problem.
5. Advantages are computed on what remains, per problem over ITS kept rollouts:
   A = (r - mean) / (population std + 1e-6), clipped to [-2.5, 2.5]
   (`reasonmaxxer.losses.group_advantages`, float32 precision).
6. Training order (`SelectionConfig.order`): ``"shuffle"`` (seeded), ``"clarity"``
   (signal clarity |A| x gated tokens / completion length, descending; the official
   recipe's order; needs per-token ``base_entropies`` and ``tau``), or ``"none"``
   (problem rank, then sample_index).

Every function is pure: input rows are never mutated; output rows are shallow copies
with ``advantage`` (float), ``group`` (int, the problem's rank among the kept problems,
0-based), ``mask_decision`` (bool) and, under ``order="clarity"``, ``clarity`` (float)
added. The input is sorted by (problem_id, sample_index) first, so the result depends
only on the rows' contents and the config, never on the order they arrive in.

Greedy completions (``sample_index < 0``, as the sample stage stores them) are not
samples from the policy and are ignored (counted in ``stats["rollouts_ignored_greedy"]``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..errors import ReasonMaxxerError
from ..schema import check_fields
from .select_histogram import format_histogram, pass_rate_histogram

__all__ = [
    "SelectionConfig",
    "ProblemStats",
    "Selection",
    "problem_stats",
    "select",
    "pass_rate_histogram",
    "format_histogram",
    "signal_clarity",
]


TRUNCATION_POLICIES = ("drop", "mask", "keep")


ORDERS = ("shuffle", "clarity", "none")
# "graded": the grader's rewards; "shuffled": the random-reward control (see `shuffle_rewards`).
REWARD_SOURCES = ("graded", "shuffled")


REQUIRED_KEYS = ("problem_id", "sample_index", "token_ids", "truncated", "reward")


_ADVICE = (
    "sample more completions per problem (--n), raise the temperature, or use problems closer to the model's level"
)


@dataclass(frozen=True)
class SelectionConfig:
    """Options of `select`.

    max_problems: cap on problems kept, best-ranked first (paper: 50 -> 1000 sequences at
        G=20); None keeps every mixed problem.
    keep_shortest: fraction in (0, 1] of the selected rollouts to keep, shortest
        completions (in tokens) first, applied globally over all selected problems, not
        per problem (official recipe: 0.8). Problems left without mixed rewards are dropped.
    truncated: "drop" | "mask" | "keep", what to do with rollouts that hit the length cap
        (see the module docstring).
    order: "shuffle" (seeded) | "clarity" (signal clarity descending; needs tau and
        base_entropies) | "none" (problem rank, then sample_index).
    seed: seed of the "shuffle" order.
    keep_unmixed: keep the problems the keep_shortest cut left without mixed rewards, with
        advantage 0 (they train the anchor only; official recipe: True); default drop them.
    rewards: "graded" (the grader's) | "shuffled": the random-reward control
        (arXiv:2506.10947), `shuffle_rewards` before step 1: a gain that survives it is not
        learned from correctness.

    Fixed choices, as the official code makes them (no key): pass rates from all of a
    problem's rollouts before the trim (OFFICIAL scripts/select_mid_pool.py:51-58), the trim
    global over all selected problems (:86-96), advantages computed after the trim
    (examples/qwen25_1p5b/04_train_tau1p4.sh:11 feeds the trimmed file to
    scripts/prepare_training_data.py, which computes them at :212-257).
    """

    max_problems: int | None = field(
        default=50, metadata={"help": "cap on problems kept, best-ranked first (None: all mixed)", "ge": 1}
    )
    keep_shortest: float = field(
        default=1.0, metadata={"help": "fraction of selected rollouts kept, shortest first", "gt": 0, "le": 1}
    )
    truncated: str = field(
        default="drop",
        metadata={"help": "rollouts that hit the length cap: drop | mask | keep", "choices": TRUNCATION_POLICIES},
    )
    order: str = field(
        default="shuffle", metadata={"help": "training order: shuffle | clarity | none", "choices": ORDERS}
    )
    seed: int = field(default=0, metadata={"help": "seed of the shuffle order"})
    keep_unmixed: bool = field(
        default=False,
        metadata={"help": "keep problems left without mixed rewards by keep_shortest, with advantage 0 (anchor only)"},
    )
    rewards: str = field(
        default="graded",
        metadata={
            "help": "graded | shuffled (random-reward control: the sampled rollouts' rewards permuted, seed `seed`)",
            "choices": REWARD_SOURCES,
        },
    )

    def __post_init__(self) -> None:
        if self.max_problems is not None and (
            isinstance(self.max_problems, bool) or not isinstance(self.max_problems, int) or self.max_problems < 1
        ):
            raise ReasonMaxxerError(
                f"SelectionConfig.max_problems must be a positive integer or None, got {self.max_problems!r}"
            )
        if not isinstance(self.keep_shortest, (int, float)):
            raise ReasonMaxxerError(
                f"SelectionConfig.keep_shortest must be a number in (0, 1] (official recipe 0.8), got {self.keep_shortest!r}"
            )
        check_fields(self, "SelectionConfig")  # bounds and choices from the field metadata


@dataclass(frozen=True)
class ProblemStats:
    """Per-problem summary of its rollouts.

    n: rollouts counted in the pass rate; n_correct: those with reward 1; pass_rate:
    n_correct / n (nan when n == 0); n_truncated: truncated rollouts of the problem (under
    truncated="drop", `select` counts the dropped ones, which are not in n); mean_length:
    mean completion length of the n rollouts, in tokens (nan when n == 0).
    """

    problem_id: str
    n: int
    n_correct: int
    pass_rate: float
    n_truncated: int
    mean_length: float


@dataclass(frozen=True)
class Selection:
    """The result of `select`.

    rows: the selected rollout rows in training order (copies, with ``advantage``,
        ``group``, ``mask_decision`` and, under order="clarity", ``clarity`` added).
    problems: the kept problems in rank order, with the statistics they were ranked by
        (i.e. before the keep_shortest cut; ``group`` of a row indexes this list).
    stats: counts (see `select`), the pass-rate histogram and the mean pass rate.
    """

    rows: list[dict]
    problems: list[ProblemStats]
    stats: dict[str, Any] = field(default_factory=dict)


def _validate(rows: Sequence[dict], extra_keys: Sequence[str] = ()) -> None:
    """Raise ReasonMaxxerError naming the first bad row (by its index in ``rows``) and key."""
    seen: dict[tuple[str, int], int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ReasonMaxxerError(f"rollout row {i}: expected a dict, got {type(row).__name__}")
        for key in (*REQUIRED_KEYS, *extra_keys):
            if key not in row or row[key] is None:
                raise ReasonMaxxerError(f"rollout row {i}: missing key {key!r} (is this a graded rollout store?)")
        if not isinstance(row["problem_id"], str):
            raise ReasonMaxxerError(
                f"rollout row {i}: 'problem_id' must be a str, got {type(row['problem_id']).__name__}"
            )
        si = row["sample_index"]
        if isinstance(si, bool) or not isinstance(si, int):
            raise ReasonMaxxerError(f"rollout row {i}: 'sample_index' must be an int, got {si!r}")
        r = row["reward"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or float(r) not in (0.0, 1.0):
            raise ReasonMaxxerError(f"rollout row {i}: 'reward' must be 1.0 (correct) or 0.0 (wrong), got {r!r}")
        try:
            len(row["token_ids"])
        except TypeError:
            raise ReasonMaxxerError(
                f"rollout row {i}: 'token_ids' must be a list of token ids, got {type(row['token_ids']).__name__}"
            ) from None
        key = (row["problem_id"], si)
        if key in seen:
            raise ReasonMaxxerError(
                f"rollout row {i}: duplicate (problem_id={key[0]!r}, sample_index={key[1]}), same as row {seen[key]}; was a shard written twice?"
            )
        seen[key] = i


def shuffle_rewards(rows: Sequence[dict], seed: int) -> list[dict]:
    """Copies of `rows` with their ``reward`` values permuted among them (seeded): the same
    number of correct rollouts overall, assigned to rollouts at random, so pass rates and
    advantages no longer follow correctness (the random-reward control). The input is not
    mutated; the order of the returned rows is that of `rows`."""
    rewards = [r["reward"] for r in rows]
    random.Random(seed).shuffle(rewards)
    return [{**r, "reward": w} for r, w in zip(rows, rewards)]


def _sampled_rows(rows: Sequence[dict], cfg: SelectionConfig) -> tuple[list[dict], int]:
    """(the sampled rows in (problem_id, sample_index) order, rewards shuffled under
    ``cfg.rewards == "shuffled"``; the number of greedy rows left out)."""
    ordered = sorted(rows, key=lambda r: (r["problem_id"], r["sample_index"]))
    sampled = [r for r in ordered if r["sample_index"] >= 0]
    n_greedy = len(ordered) - len(sampled)
    if not sampled:
        raise ReasonMaxxerError(
            f"select: all {n_greedy} rows are greedy completions (sample_index -1); sample with --n >= 2 instead of --greedy"
        )
    return (shuffle_rewards(sampled, cfg.seed) if cfg.rewards == "shuffled" else sampled), n_greedy


def _is_correct(row: dict) -> bool:
    return float(row["reward"]) == 1.0


def _group_by_problem(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["problem_id"], []).append(row)
    return groups


def _stats_of(pid: str, rows: Sequence[dict], n_truncated: int | None = None) -> ProblemStats:
    n = len(rows)
    c = sum(_is_correct(r) for r in rows)
    return ProblemStats(
        problem_id=pid,
        n=n,
        n_correct=c,
        pass_rate=c / n if n else math.nan,
        n_truncated=sum(bool(r["truncated"]) for r in rows) if n_truncated is None else n_truncated,
        mean_length=sum(len(r["token_ids"]) for r in rows) / n if n else math.nan,
    )


def problem_stats(rows: Sequence[dict]) -> list[ProblemStats]:
    """One `ProblemStats` per problem_id in ``rows`` (no truncation policy applied), sorted by problem_id.

    Rows need problem_id, sample_index, token_ids, truncated and reward (1.0 / 0.0).
    """
    _validate(rows)
    return [_stats_of(pid, g) for pid, g in sorted(_group_by_problem(rows).items())]


def _rank_key(s: ProblemStats) -> tuple:
    """|pass rate - 0.5| ascending, then fewer truncations, shorter mean length, problem_id.

    The distance is an exact fraction (in floats |0.3 - 0.5| != |0.7 - 0.5|). mean_length
    compares fine as a float: a correctly rounded quotient maps equal ratios to equal floats.
    """
    return (Fraction(abs(2 * s.n_correct - s.n), 2 * s.n), s.n_truncated, s.mean_length, s.problem_id)


def signal_clarity(advantage: float, entropies: Sequence[float], tau: float) -> float:
    """|A| * (number of entropies > tau) / len(entropies); 0.0 for an empty completion.

    advantage: the rollout's group-normalised advantage; entropies: the base model's
    per-completion-token entropies, nats; tau: the gate threshold, nats (strict >, as
    `reasonmaxxer.gating.entropy_gate`).
    """
    n = len(entropies)
    if n == 0:
        return 0.0
    gated = sum(1 for h in entropies if h > tau)
    return abs(float(advantage)) * gated / n


def _advantages(rewards: list[float], groups: list[int]) -> list[float]:
    """Group-normalised advantages via `reasonmaxxer.losses.group_advantages` (float32 values)."""
    if not rewards:
        return []
    import torch

    from ..core.losses import group_advantages

    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups, dtype=torch.long))
    return [float(a) for a in adv.tolist()]


def _empty_selection_error(problems: list[ProblemStats], counts: dict[str, int], why: str) -> ReasonMaxxerError:
    hist = pass_rate_histogram(problems)
    msg = (
        f"no problem {why}: {counts['all_wrong']} all-wrong, {counts['mixed']} mixed, "
        f"{counts['all_correct']} all-correct of {counts['total']} problems"
    )
    if counts.get("empty"):
        msg += f" ({counts['empty']} had only truncated rollouts: raise --max-new-tokens or use truncated='mask')"
    msg += f"; {_ADVICE}"
    return ReasonMaxxerError(f"{msg}\npass-rate histogram (problems per bin):\n{format_histogram(hist)}")


def select(rows: Sequence[dict], cfg: SelectionConfig = SelectionConfig(), *, tau: float | None = None) -> Selection:
    """Select the training rollouts (see the module docstring for the steps).

    rows: rollout rows with problem_id, sample_index, token_ids, truncated, reward (1.0 /
    0.0); under ``cfg.order == "clarity"`` also base_entropies (nats, one per completion
    token). tau: gate threshold in nats, required for order="clarity", unused otherwise.

    Returns a `Selection`; its ``stats`` holds problems_total, problems_mixed,
    problems_all_correct, problems_all_wrong, problems_empty (no rollout left after the
    truncation policy), problems_kept, problems_dropped_length (lost mixed success to the
    keep_shortest cut), rollouts_total, rollouts_ignored_greedy, rollouts_kept,
    rollouts_dropped_truncated, rollouts_masked_truncated, rollouts_dropped_length,
    rollouts_dropped_unmixed (of problems_dropped_length), pass_rate_histogram (10 bins over
    [0, 1], all problems with rollouts) and mean_pass_rate (same problems; nan if none).

    Raises ReasonMaxxerError on a malformed row (naming its index and key), on no rows, or
    when no problem has mixed success (the message carries the pass-rate histogram).
    """
    _check_inputs(rows, cfg, tau)

    index_of = {(r["problem_id"], r["sample_index"]): i for i, r in enumerate(rows)}  # for error messages
    sampled, n_greedy = _sampled_rows(rows, cfg)
    # 1. truncation policy (rows copied here; the input is never mutated)
    kept, truncated_by_pid, n_dropped_trunc, n_masked = _apply_truncation(sampled, cfg)
    all_pids = sorted({r["problem_id"] for r in sampled})

    # 2. pass rates
    groups = _group_by_problem(kept)
    problems = [_stats_of(pid, groups.get(pid, []), truncated_by_pid.get(pid, 0)) for pid in all_pids]
    with_rollouts = [s for s in problems if s.n > 0]
    mixed = [s for s in with_rollouts if 0 < s.n_correct < s.n]
    counts = {
        "total": len(problems),
        "mixed": len(mixed),
        "all_correct": sum(s.n_correct == s.n for s in with_rollouts),
        "all_wrong": sum(s.n_correct == 0 for s in with_rollouts),
        "empty": len(problems) - len(with_rollouts),
    }
    if not mixed:
        raise _empty_selection_error(problems, counts, "has mixed success (0 < pass rate < 1)")

    # 3. rank and cap
    ranked = sorted(mixed, key=_rank_key)
    if cfg.max_problems is not None:
        ranked = ranked[: cfg.max_problems]
    selected = [row for s in ranked for row in groups[s.problem_id]]

    # 4. keep the shortest fraction globally, then drop groups that lost mixed success
    final, left, n_dropped_len, n_dropped_unmixed = _keep_shortest(ranked, selected, cfg)

    # 5. advantages on what remains; 6. training order
    out = _with_advantages(final, left)
    _order(out, cfg, tau, index_of)

    stats: dict[str, Any] = {
        "problems_total": counts["total"],
        "problems_mixed": counts["mixed"],
        "problems_all_correct": counts["all_correct"],
        "problems_all_wrong": counts["all_wrong"],
        "problems_empty": counts["empty"],
        "problems_kept": len(final),
        "problems_dropped_length": len(ranked) - len(final),
        "rollouts_total": len(rows),
        "rollouts_ignored_greedy": n_greedy,
        "rollouts_kept": len(out),
        "rollouts_dropped_truncated": n_dropped_trunc,
        "rollouts_masked_truncated": n_masked,
        "rollouts_dropped_length": n_dropped_len,
        "rollouts_dropped_unmixed": n_dropped_unmixed,
        "pass_rate_histogram": pass_rate_histogram(problems),
        "mean_pass_rate": (sum(s.pass_rate for s in with_rollouts) / len(with_rollouts)) if with_rollouts else math.nan,
    }
    return Selection(rows=out, problems=final, stats=stats)


def _check_inputs(rows: Sequence[dict], cfg: SelectionConfig, tau: float | None) -> None:
    if not isinstance(cfg, SelectionConfig):
        raise ReasonMaxxerError(f"select: cfg must be a SelectionConfig, got {type(cfg).__name__}")
    if cfg.order == "clarity":
        if tau is None:
            raise ReasonMaxxerError("select: order='clarity' needs tau (the gate threshold, nats), e.g. tau=1.4")
        if not math.isfinite(float(tau)):
            raise ReasonMaxxerError(f"select: tau must be a finite number of nats, got {tau!r}")
    _validate(rows)
    if not rows:
        raise ReasonMaxxerError(
            "select: got no rollout rows; run the sample stage first (or check the rollout store path)"
        )


def _apply_truncation(sampled: Sequence[dict], cfg: SelectionConfig) -> tuple[list[dict], dict[str, int], int, int]:
    """Step 1: drop or mask (reward 0, mask_decision) truncated rollouts, on copies of the rows.
    Returns (kept rows, truncated count per problem, rows dropped, rows masked)."""
    truncated_by_pid: dict[str, int] = {}
    kept: list[dict] = []
    n_dropped_trunc = n_masked = 0
    for r in sampled:
        is_trunc = bool(r["truncated"])
        truncated_by_pid[r["problem_id"]] = truncated_by_pid.get(r["problem_id"], 0) + is_trunc
        if is_trunc and cfg.truncated == "drop":
            n_dropped_trunc += 1
            continue
        row = dict(r)
        row["mask_decision"] = is_trunc and cfg.truncated == "mask"
        if row["mask_decision"]:
            row["reward"] = 0.0
            n_masked += 1
        kept.append(row)
    return kept, truncated_by_pid, n_dropped_trunc, n_masked


def _keep_shortest(
    ranked: list[ProblemStats], selected: list[dict], cfg: SelectionConfig
) -> tuple[list[ProblemStats], dict[str, list[dict]], int, int]:
    """Step 4: keep the shortest `cfg.keep_shortest` of the selected rollouts (globally), then
    drop the problems that lost mixed success. Returns (problems kept in rank order, their rows
    by problem, rollouts dropped for length, rollouts dropped with their unmixed problem)."""
    n_dropped_len = 0
    if cfg.keep_shortest < 1.0:
        n_keep = min(len(selected), int(math.floor(cfg.keep_shortest * len(selected) + 0.5)))
        by_len = sorted(selected, key=lambda r: (len(r["token_ids"]), r["problem_id"], r["sample_index"]))
        survivors = {(r["problem_id"], r["sample_index"]) for r in by_len[:n_keep]}
        n_dropped_len = len(selected) - n_keep
        selected = [r for r in selected if (r["problem_id"], r["sample_index"]) in survivors]
    left = _group_by_problem(selected)
    final = [
        s
        for s in ranked
        if s.problem_id in left and (cfg.keep_unmixed or len({_is_correct(r) for r in left[s.problem_id]}) == 2)
    ]
    final_ids = {s.problem_id for s in final}
    n_dropped_unmixed = sum(
        len(left[s.problem_id]) for s in ranked if s.problem_id in left and s.problem_id not in final_ids
    )
    if not final:
        raise ReasonMaxxerError(
            f"select: keep_shortest={cfg.keep_shortest} left no problem with mixed success "
            f"(of {len(ranked)} selected); raise keep_shortest (1.0 keeps every rollout)"
        )
    return final, left, n_dropped_len, n_dropped_unmixed


def _with_advantages(final: list[ProblemStats], left: dict[str, list[dict]]) -> list[dict]:
    """Step 5: the kept rows in rank order, each with its `group` and group-normalised `advantage`."""
    out: list[dict] = []
    for g, s in enumerate(final):
        for r in left[s.problem_id]:
            r["group"] = g
            out.append(r)
    adv = _advantages([float(r["reward"]) for r in out], [r["group"] for r in out])
    for r, a in zip(out, adv):
        r["advantage"] = a
    return out


def _order(out: list[dict], cfg: SelectionConfig, tau: float | None, index_of: dict) -> None:
    """Step 6: put `out` in training order, in place (shuffle, or by signal clarity)."""
    if cfg.order == "shuffle":
        random.Random(cfg.seed).shuffle(out)
    elif cfg.order == "clarity":
        for r in out:
            ent = r.get("base_entropies")
            where = f"rollout row {index_of[(r['problem_id'], r['sample_index'])]} (problem_id={r['problem_id']!r}, sample_index={r['sample_index']})"
            if ent is None:
                raise ReasonMaxxerError(
                    f"{where}: missing key 'base_entropies', needed by order='clarity'; run the score stage first or use order='shuffle'"
                )
            if len(ent) != len(r["token_ids"]):
                raise ReasonMaxxerError(
                    f"{where}: {len(ent)} base_entropies for {len(r['token_ids'])} completion tokens; re-run the score stage"
                )
            r["clarity"] = signal_clarity(r["advantage"], ent, float(tau))
        out.sort(key=lambda r: (-r["clarity"], r["group"], r["sample_index"]))
