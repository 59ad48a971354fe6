"""Evaluation metrics of graded rollouts: pass@1 (avg@n), unbiased pass@k, maj@k, greedy accuracy.

Input is one row per sampled completion, as read from the rollout store, with at least
``problem_id``, ``sample_index``, ``strict_correct``, ``lenient_correct``,
``strict_extracted``, ``lenient_extracted`` and ``truncated``. Both grading modes are
reported side by side (strict: the answer must be where the prompt asked for it, e.g.
in ``\\boxed{}``; lenient: a fallback extractor, as lm-evaluation-harness does for GSM8K).

What each number is:

- pass@1 is avg@n: the fraction of a problem's samples that are correct, averaged over
  problems, so every problem weighs the same whatever its number of samples. This is
  what the paper reports (pass@1 at T=0.6, top_p 0.95).
- pass@k is the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k),
  per problem with its own n and c, averaged over problems.
- maj@k votes over the *first* k samples (by ``sample_index``) of each problem; the
  vote compares answer strings after :func:`normalize_answer`, which is light string
  clean-up, not mathematical equivalence: "1/2" and "\\frac{1}{2}" are different votes,
  so maj@k can underestimate a model whose answers vary in form.
- Intervals are 95%, normal approximation over problems (mean +- 1.96 standard errors,
  sample standard deviation), clipped to [0, 1]. This treats problems as the random
  unit and ignores the sampling noise within a problem; with few problems (< ~30) or
  means near 0 or 1 it is rough. Greedy accuracy (one completion per problem) uses the
  Wilson score interval instead.
- Parse-failure and truncation rates are pooled over samples (fraction of completions); the
  mean completion length (tokens, over samples) is reported when the rows carry ``token_ids``.

A k larger than some problem's number of samples is skipped for the whole report (with
a note), so every reported pass@k / maj@k is over the same set of problems.

Pure functions of the rows (no model, no store): `evaluate` -> `EvalReport`, `to_markdown`,
`save_report`. Decoding the rows and reading them from rollout stores is `stages.evaluate`.
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.stats import mean_ci95, pass_at_k, wilson_ci95
from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes

MODES = ("strict", "lenient")


BREAKDOWN_KEYS = ("tier", "subject", "level", "source")


MISSING_GROUP = "(missing)"


ROW_FIELDS = (
    "problem_id",
    "sample_index",
    "strict_correct",
    "lenient_correct",
    "strict_extracted",
    "lenient_extracted",
    "truncated",
)


_LATEX_SPACES = re.compile(r"\\[!,;:]|\\q?quad")


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


_INT_TRAILING_ZEROS = re.compile(r"^([+-]?\d+)\.0+$")


def normalize_answer(answer: str | None) -> str | None:
    """Light string clean-up used to compare answers in a majority vote.

    In order: strip; drop ``$``; drop LaTeX spacing (``\\!`` ``\\,`` ``\\;`` ``\\:``
    ``\\quad``) and all whitespace; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; drop
    ``\\left``/``\\right``; drop one trailing ``.``; drop thousands separators in a
    plain number ("1,000" -> "1000"; note a 2-tuple like "1,000" is read as a number);
    drop a zero fractional part of an integer ("12.0" -> "12"). An answer that is empty
    after this is None (no vote). No mathematical equivalence is attempted.
    """
    if answer is None:
        return None
    s = str(answer).strip().replace("$", "")
    s = _LATEX_SPACES.sub("", s)
    s = "".join(s.split())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    if s.endswith("."):
        s = s[:-1]
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = _INT_TRAILING_ZEROS.sub(r"\1", s)
    return s or None


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Majority vote over the first k answers; 1.0 if the voted answer is correct, else 0.0.

    answers: extracted answers in sample order (None = nothing extracted, no vote);
    correct: the grade of each sample. Answers are compared after
    :func:`normalize_answer`; a tie goes to the answer that occurred first. The voted
    answer's grade is the grade of its first sample (samples with the same normalised
    answer are expected to share a grade). No votes at all -> 0.0.
    """
    k = operator.index(k)
    if len(answers) != len(correct):
        raise ReasonMaxxerError(
            f"maj_at_k: {len(answers)} answers but {len(correct)} grades; pass one grade per answer"
        )
    if not 1 <= k <= len(answers):
        raise ReasonMaxxerError(f"maj_at_k: need 1 <= k <= number of answers ({len(answers)}), got k={k}")
    first: dict[str, int] = {}
    votes: Counter[str] = Counter()
    for i in range(k):
        a = normalize_answer(answers[i])
        if a is None:
            continue
        first.setdefault(a, i)
        votes[a] += 1
    if not votes:
        return 0.0
    winner = max(votes, key=lambda a: (votes[a], -first[a]))
    return 1.0 if correct[first[winner]] else 0.0


@dataclass(frozen=True)
class Estimate:
    """A score in [0, 1] with its 95% interval; n is the number of problems it is over."""

    value: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class ModeMetrics:
    """Metrics for one grading mode (strict or lenient). Dict keys are k."""

    avg_at_n: Estimate
    pass_at_k: dict[int, Estimate]  # k > 1 only; pass@1 is avg_at_n
    maj_at_k: dict[int, Estimate]
    greedy: Estimate | None  # Wilson interval; None without greedy rows
    parse_failure_rate: float  # fraction of samples whose extracted answer is None


@dataclass(frozen=True)
class GroupMetrics:
    """avg@n over the problems whose metadata[key] == value (value as a string)."""

    value: str
    n_problems: int
    n_samples: int
    strict_avg_at_n: float
    lenient_avg_at_n: float


@dataclass(frozen=True)
class EvalReport:
    label: str
    n_problems: int
    n_samples: int
    min_samples: int  # fewest samples of any problem
    max_samples: int
    ks: tuple[int, ...]  # k values reported (all <= min_samples)
    strict: ModeMetrics
    lenient: ModeMetrics
    truncation_rate: float  # fraction of samples truncated
    breakdown: dict[str, tuple[GroupMetrics, ...]]  # metadata key -> groups
    notes: tuple[str, ...]
    weights: dict = field(default_factory=dict)  # what was evaluated: see `evaluate.weights_record`
    mean_tokens: float | None = None  # completion tokens per sample, mean (None: rows without token_ids)

    def mode(self, name: str) -> ModeMetrics:
        if name not in MODES:
            raise ReasonMaxxerError(f"unknown grading mode {name!r}; use one of {MODES}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (k keys become strings)."""
        d = asdict(self)
        for mode in MODES:
            for key in ("pass_at_k", "maj_at_k"):
                d[mode][key] = {str(k): v for k, v in d[mode][key].items()}
        d["ks"] = list(self.ks)
        d["notes"] = list(self.notes)
        d["breakdown"] = {key: list(groups) for key, groups in d["breakdown"].items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        """Inverse of :meth:`to_dict`."""

        def est(x):
            return None if x is None else Estimate(float(x["value"]), float(x["low"]), float(x["high"]), int(x["n"]))

        def mode(x):
            return ModeMetrics(
                avg_at_n=est(x["avg_at_n"]),
                pass_at_k={int(k): est(v) for k, v in x["pass_at_k"].items()},
                maj_at_k={int(k): est(v) for k, v in x["maj_at_k"].items()},
                greedy=est(x["greedy"]),
                parse_failure_rate=float(x["parse_failure_rate"]),
            )

        try:
            return cls(
                label=str(d["label"]),
                n_problems=int(d["n_problems"]),
                n_samples=int(d["n_samples"]),
                min_samples=int(d["min_samples"]),
                max_samples=int(d["max_samples"]),
                ks=tuple(int(k) for k in d["ks"]),
                strict=mode(d["strict"]),
                lenient=mode(d["lenient"]),
                truncation_rate=float(d["truncation_rate"]),
                breakdown={key: tuple(GroupMetrics(**g) for g in groups) for key, groups in d["breakdown"].items()},
                notes=tuple(d["notes"]),
                weights=dict(d.get("weights") or {}),
                mean_tokens=None if d.get("mean_tokens") is None else float(d["mean_tokens"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReasonMaxxerError(
                f"not an evaluation report ({type(e).__name__}: {e}); regenerate it with evaluate()"
            ) from e


def _check_rows(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], what: str) -> list[Mapping[str, Any]]:
    out = list(rows)
    for i, row in enumerate(out):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ReasonMaxxerError(f"{what} row {i}: missing field(s) {', '.join(missing)}")
        if not isinstance(row["problem_id"], str):
            raise ReasonMaxxerError(
                f"{what} row {i}: problem_id must be a string, got {type(row['problem_id']).__name__}"
            )
    return out


def _group_sort_key(v: Any) -> tuple:
    if v is MISSING_GROUP:
        return (2, 0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v, "")
    return (1, 0, str(v))


def evaluate(
    rows: Iterable[Mapping[str, Any]],
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    ks: Sequence[int] = (1, 4, 8, 16),
    greedy_rows: Iterable[Mapping[str, Any]] | None = None,
    label: str = "",
) -> EvalReport:
    """Evaluate sampled rollouts (one row per completion); see the module docstring.

    metadata: problem_id -> {"tier": ..., "subject": ..., "level": ..., "source": ...};
    each of those keys present for some evaluated problem gets a breakdown table
    (problems without it go to the "(missing)" group). greedy_rows: one row per problem
    with ``problem_id``, ``strict_correct``, ``lenient_correct``.
    """
    rows = _check_rows(rows, ROW_FIELDS, "rollout")
    if not rows:
        raise ReasonMaxxerError("no rollouts to evaluate: the input has zero rows; sample rollouts first")
    ks_sorted = sorted({operator.index(k) for k in ks})
    if not ks_sorted or ks_sorted[0] < 1:
        raise ReasonMaxxerError(f"ks must be positive integers, got {tuple(ks)}")
    problems = _samples_by_problem(rows)
    counts = [len(s) for s in problems.values()]
    n_min, n_max = min(counts), max(counts)

    notes: list[str] = []
    used_ks = [k for k in ks_sorted if k <= n_min]
    skipped = [k for k in ks_sorted if k > n_min]
    if skipped:
        short = sum(c < skipped[0] for c in counts)
        notes.append(
            f"k={', '.join(map(str, skipped))} skipped: {short} problem(s) have fewer than {skipped[0]} samples "
            f"(fewest: {n_min})"
        )
    greedy = None if greedy_rows is None else _check_greedy(greedy_rows, problems, notes)

    accuracy: dict[str, dict[str, float]] = {}  # mode -> problem_id -> avg@n
    modes = {}
    for mode in MODES:
        accuracy[mode], modes[mode] = _mode_metrics(mode, problems, rows, used_ks, greedy)

    return EvalReport(
        label=label,
        n_problems=len(problems),
        n_samples=len(rows),
        min_samples=n_min,
        max_samples=n_max,
        ks=tuple(used_ks),
        strict=modes["strict"],
        lenient=modes["lenient"],
        truncation_rate=sum(bool(r["truncated"]) for r in rows) / len(rows),
        breakdown=_breakdown(metadata or {}, problems, accuracy),
        notes=tuple(notes),
        mean_tokens=sum(len(r["token_ids"]) for r in rows) / len(rows) if all("token_ids" in r for r in rows) else None,
    )


def _samples_by_problem(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """problem_id (sorted) -> its rows by sample_index; a repeated (problem, sample) is an error."""
    by_problem: dict[str, dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        pid, si = row["problem_id"], operator.index(row["sample_index"])
        samples = by_problem.setdefault(pid, {})
        if si in samples:
            raise ReasonMaxxerError(f"duplicate rollout: problem {pid!r} has sample_index {si} twice")
        samples[si] = row
    return {pid: [s[i] for i in sorted(s)] for pid, s in sorted(by_problem.items())}


def _check_greedy(
    greedy_rows: Iterable[Mapping[str, Any]], problems: Mapping[str, Any], notes: list[str]
) -> list[Mapping[str, Any]]:
    """The greedy rows, checked (one per problem, not empty); a note if they cover other problems."""
    greedy = _check_rows(greedy_rows, ("problem_id", "strict_correct", "lenient_correct"), "greedy")
    ids = [g["problem_id"] for g in greedy]
    if len(set(ids)) != len(ids):
        dup = next(p for p, c in Counter(ids).items() if c > 1)
        raise ReasonMaxxerError(f"greedy rows: problem {dup!r} appears more than once; pass one greedy row per problem")
    if not greedy:
        raise ReasonMaxxerError("greedy_rows is empty; pass None to skip greedy accuracy")
    if set(ids) != set(problems):
        notes.append(
            f"greedy rows cover {len(set(ids) & set(problems))} of {len(problems)} sampled problems "
            f"(+{len(set(ids) - set(problems))} not sampled)"
        )
    return greedy


def _mode_metrics(
    mode: str,
    problems: Mapping[str, Sequence[Mapping[str, Any]]],
    rows: Sequence[Mapping[str, Any]],
    used_ks: Sequence[int],
    greedy: Sequence[Mapping[str, Any]] | None,
) -> tuple[dict[str, float], ModeMetrics]:
    """One grading mode's figures: (problem_id -> avg@n, the mode's metrics)."""
    ok, ext = f"{mode}_correct", f"{mode}_extracted"
    acc = {pid: sum(bool(r[ok]) for r in s) / len(s) for pid, s in problems.items()}
    pass_k, maj_k = {}, {}
    for k in used_ks:
        if k > 1:
            pk = [pass_at_k(len(s), sum(bool(r[ok]) for r in s), k) for s in problems.values()]
            pass_k[k] = Estimate(*mean_ci95(pk), len(pk))
        mk = [maj_at_k([r[ext] for r in s], [bool(r[ok]) for r in s], k) for s in problems.values()]
        maj_k[k] = Estimate(*mean_ci95(mk), len(mk))
    g_est = None
    if greedy is not None:
        wins = sum(bool(g[ok]) for g in greedy)
        g_est = Estimate(wins / len(greedy), *wilson_ci95(wins, len(greedy)), len(greedy))
    return acc, ModeMetrics(
        avg_at_n=Estimate(*mean_ci95(list(acc.values())), len(acc)),
        pass_at_k=pass_k,
        maj_at_k=maj_k,
        greedy=g_est,
        parse_failure_rate=sum(r[ext] is None for r in rows) / len(rows),
    )


def _breakdown(
    meta: Mapping[str, Mapping[str, Any]],
    problems: Mapping[str, Sequence[Mapping[str, Any]]],
    accuracy: Mapping[str, Mapping[str, float]],
) -> dict[str, tuple[GroupMetrics, ...]]:
    """Per metadata key present for some problem: avg@n of each group of problems."""
    breakdown: dict[str, tuple[GroupMetrics, ...]] = {}
    for key in BREAKDOWN_KEYS:
        if not any(key in (meta.get(pid) or {}) for pid in problems):
            continue
        groups: dict[Any, list[str]] = {}
        for pid in problems:
            groups.setdefault((meta.get(pid) or {}).get(key, MISSING_GROUP), []).append(pid)
        breakdown[key] = tuple(
            GroupMetrics(
                value=str(v),
                n_problems=len(pids),
                n_samples=sum(len(problems[p]) for p in pids),
                strict_avg_at_n=sum(accuracy["strict"][p] for p in pids) / len(pids),
                lenient_avg_at_n=sum(accuracy["lenient"][p] for p in pids) / len(pids),
            )
            for v, pids in sorted(groups.items(), key=lambda kv: _group_sort_key(kv[0]))
        )
    return breakdown


def _fmt(e: Estimate | None) -> str:
    return "-" if e is None else f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def to_markdown(report: EvalReport) -> str:
    """Compact markdown: a metrics table (strict | lenient), then one table per breakdown key."""
    s, l = report.strict, report.lenient
    spp = (
        str(report.min_samples)
        if report.min_samples == report.max_samples
        else f"{report.min_samples}-{report.max_samples}"
    )
    out = [
        f"## Evaluation{': ' + report.label if report.label else ''}",
        "",
        f"{report.n_problems} problems, {report.n_samples} samples ({spp} per problem), "
        f"truncated {report.truncation_rate:.1%}"
        + ("" if report.mean_tokens is None else f", {report.mean_tokens:.1f} completion tokens on average")
        + ". Intervals: 95%, normal approx. over problems; greedy: Wilson.",
        *(
            [
                f"Weights: {report.weights['kind']} `{report.weights['spec']}` in {report.weights['dtype']}, "
                f"served by {report.weights['served_by']}."
            ]
            if report.weights
            else []
        ),
        "",
        "| metric | strict | lenient |",
        "|---|---|---|",
        f"| pass@1 (avg@n) | {_fmt(s.avg_at_n)} | {_fmt(l.avg_at_n)} |",
    ]
    out += [f"| pass@{k} | {_fmt(s.pass_at_k[k])} | {_fmt(l.pass_at_k[k])} |" for k in s.pass_at_k]
    out += [f"| maj@{k} | {_fmt(s.maj_at_k[k])} | {_fmt(l.maj_at_k[k])} |" for k in s.maj_at_k]
    if s.greedy is not None:
        out.append(f"| greedy (n={s.greedy.n}) | {_fmt(s.greedy)} | {_fmt(l.greedy)} |")
    out.append(f"| parse failures | {s.parse_failure_rate:.1%} | {l.parse_failure_rate:.1%} |")
    for key, groups in report.breakdown.items():
        out += ["", f"### By {key}", "", f"| {key} | problems | strict avg@n | lenient avg@n |", "|---|---|---|---|"]
        out += [f"| {g.value} | {g.n_problems} | {g.strict_avg_at_n:.3f} | {g.lenient_avg_at_n:.3f} |" for g in groups]
    if report.notes:
        out += [""] + [f"- {n}" for n in report.notes]
    return "\n".join(out) + "\n"


def save_report(report: EvalReport, path_json: str | os.PathLike, path_md: str | os.PathLike | None = None) -> None:
    """Write the report as JSON (and optionally markdown); each file is replaced atomically."""
    atomic_write_bytes(Path(path_json), (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    if path_md is not None:
        atomic_write_bytes(Path(path_md), to_markdown(report).encode())
