"""Comparison and grading: an extracted answer against the gold via math-verify (see `reasonmaxxer.verify`).

`grade` grades one completion in this process; `grade_one` is what it and the pool workers
(`verify.pool`) run. Comparison results other than timeouts are cached per process.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ReasonMaxxerError
from .extract import MAX_ANSWER_CHARS, UNESCAPED_DOLLAR_RE, extract_answer

DEFAULT_INNER_TIMEOUT_S = 5  # math-verify's per-call alarm in grade() (its own default), seconds
_NUMBER_WITH_WORDS_RE = re.compile(r"(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s*(?:[A-Za-z]{2,}[\s\-']*)+")


@dataclass(frozen=True)
class Verdict:
    """One mode's grading of one completion.

    ``extracted``: the answer text taken from the completion (truncated to MAX_ANSWER_CHARS + "…"
    when longer); None = no answer found. ``source``: "boxed" | "answer_is" | "last_number" | None.
    ``reason``: "match" | "mismatch" | "no_answer" | "timeout" | "error: <short msg>".
    """

    correct: bool
    extracted: str | None
    source: str | None
    reason: str


@dataclass(frozen=True)
class Grade:
    """Both modes for one completion: ``strict`` (box / "answer is" only) and ``lenient``
    (strict, else the last number)."""

    strict: Verdict
    lenient: Verdict


def _too_long(text: str) -> str | None:
    return f"error: answer too long ({len(text)} chars > {MAX_ANSWER_CHARS})" if len(text) > MAX_ANSWER_CHARS else None


def _shown(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_ANSWER_CHARS:
        return text
    return text[:MAX_ANSWER_CHARS] + "…"


def _for_math_verify(text: str) -> str:
    """Drop $ delimiters and reduce "18 dollars" to "18" (math-verify reads the words as symbols)."""
    t = UNESCAPED_DOLLAR_RE.sub("", text).strip()
    m = _NUMBER_WITH_WORDS_RE.fullmatch(t)
    return m.group(1) if m else t


def _mv_parse(text: str, inner_timeout: int) -> list:
    """math-verify parses of ``text``: LaTeX in $...$, else a plain expression. Raises its
    TimeoutException; [] when nothing parses."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    t = _for_math_verify(text)
    res = parse(f"${t}$", [LatexExtractionConfig()], parsing_timeout=inner_timeout, raise_on_error=True)
    if not any(not isinstance(r, str) for r in res):
        res = parse(t, [ExprExtractionConfig()], parsing_timeout=inner_timeout, raise_on_error=True) or res
    return res


@functools.lru_cache(maxsize=4096)
def _gold_parse(gold: str, inner_timeout: int) -> tuple:
    return tuple(_mv_parse(gold, inner_timeout))  # golds repeat G times per problem: parse once


_COMPARE_CACHE: dict[tuple[str, str, int], str] = {}
_COMPARE_CACHE_SIZE = 8192


def _compare(gold: str, answer: str, inner_timeout: int) -> str:
    """ "match" | "mismatch" | "timeout" | "error: ..." for one extracted answer.

    Results other than "timeout" are cached per process (rollouts of one problem mostly repeat
    a few answers, and a LaTeX parse costs ~20 ms); a timeout is retried next time.
    """
    key = (gold, answer, inner_timeout)
    reason = _COMPARE_CACHE.get(key)
    if reason is None:
        reason = _compare_uncached(gold, answer, inner_timeout)
        if reason != "timeout":
            if len(_COMPARE_CACHE) >= _COMPARE_CACHE_SIZE:
                _COMPARE_CACHE.clear()
            _COMPARE_CACHE[key] = reason
    return reason


def _compare_uncached(gold: str, answer: str, inner_timeout: int) -> str:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    too_long = _too_long(gold)
    if too_long:
        return "error: gold" + too_long[len("error: answer") :]
    too_long = _too_long(answer)
    if too_long:
        return too_long
    try:
        golds = _gold_parse(gold, inner_timeout)
        if not golds:
            return f"error: math-verify cannot parse gold {gold[:40]!r}"
        preds = _mv_parse(answer, inner_timeout)
    except TimeoutException:
        return "timeout"
    if not preds:
        return "mismatch"
    timed_out, error = False, None
    pairs = sorted(
        ((g, p) for g in golds for p in preds), key=lambda gp: isinstance(gp[0], str) + isinstance(gp[1], str)
    )
    for g, p in pairs:
        try:
            if verify(g, p, timeout_seconds=inner_timeout, raise_on_error=True):
                return "match"
        except TimeoutException:
            timed_out = True
        except Exception as e:  # noqa: BLE001 - sympy raises anything; reported, not swallowed
            error = error or f"error: {type(e).__name__}: {str(e)[:80]}"
    if timed_out:
        return "timeout"
    return error or "mismatch"


def grade_one(gold: str, completion: str, inner_timeout: int) -> Grade:
    """Both modes for one completion, math-verify's alarms set to `inner_timeout` s (no checks)."""
    strict_text, strict_src = extract_answer(completion, "strict")
    if strict_text is None:
        strict = Verdict(False, None, None, "no_answer")
        text, src = extract_answer(completion, "lenient")
        if text is None:
            return Grade(strict, strict)
        reason = _compare(gold, text, inner_timeout)
        return Grade(strict, Verdict(reason == "match", _shown(text), src, reason))
    reason = _compare(gold, strict_text, inner_timeout)
    v = Verdict(reason == "match", _shown(strict_text), strict_src, reason)
    return Grade(v, v)


def check_item(i: int, gold, completion) -> None:
    """Raise unless `gold` and `completion` (item `i`) are both str."""
    if not isinstance(gold, str) or not isinstance(completion, str):
        raise ReasonMaxxerError(
            f"item {i}: gold and completion must be str, got {type(gold).__name__} and {type(completion).__name__}"
        )


def grade(gold: str, completion: str) -> Grade:
    """Grade one completion in the calling process (must be the main thread: math-verify uses
    signal.alarm). math-verify's own 5 s alarms apply per call; there is no outer deadline."""
    check_item(0, gold, completion)
    if threading.current_thread() is not threading.main_thread():
        raise ReasonMaxxerError(
            "grade() must run in the main thread (math-verify uses signal.alarm); "
            "use grade_many(..., workers=1) from other threads"
        )
    return grade_one(gold, completion, DEFAULT_INNER_TIMEOUT_S)


def parse_failures(grades: Sequence[Grade]) -> dict[str, int]:
    """Number of grades with no extracted answer, per mode: {"strict": n, "lenient": n}."""
    return {
        "strict": sum(g.strict.extracted is None for g in grades),
        "lenient": sum(g.lenient.extracted is None for g in grades),
    }


def failed_grade(completion: str, reason: str) -> Grade:
    """Both modes incorrect with ``reason``, keeping what extraction finds (done in the caller)."""
    s_text, s_src = extract_answer(completion, "strict")
    l_text, l_src = (s_text, s_src) if s_text is not None else extract_answer(completion, "lenient")
    return Grade(Verdict(False, _shown(s_text), s_src, reason), Verdict(False, _shown(l_text), l_src, reason))
