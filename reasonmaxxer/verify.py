"""Grading: extract a final answer from a completion and compare it with the gold via math-verify.

Extraction (our code, linear time in the completion length)
  strict   1. the content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` that closes (balanced
              braces; escaped ``\\{``/``\\}`` are ignored; an unclosed ``\\boxed{`` is skipped, so an
              earlier closed one still counts; "last" = the one whose closing brace comes last, so
              ``\\boxed{\\boxed{7}}`` gives the outer content). Empty boxes are skipped.
           2. else the text after the LAST "answer is" (case-insensitive; covers "The answer is X",
              "the final answer is: X") up to the end of the line or sentence (a ``.`` followed by
              whitespace or the end), with ``$``, ``\\(``/``\\)``, ``**`` and a trailing ``.`` removed.
  lenient  as strict; only if strict finds nothing, the LAST number in the completion: integers,
           negatives, decimals, thousands separators (``1,080``), fractions (``3/4``,
           ``\\frac{3}{4}``).
  The source is reported as ``"boxed"``, ``"answer_is"`` or ``"last_number"``.

Comparison (math-verify's own ``parse``/``verify``, no symbolic equality of ours)
  The extracted text and the gold are each parsed by math-verify, first as LaTeX wrapped in
  ``$...$`` (``LatexExtractionConfig``); if that yields no sympy object, as a plain expression
  (``ExprExtractionConfig``). A number followed only by words ("18 dollars") is reduced to the
  number first. ``verify(gold, pred)`` is then tried for each pair of parses (gold first: it is
  asymmetric). So ``025`` == ``25``, ``27.0`` == ``27``, ``0.5`` == ``\\frac{1}{2}``, ``1,080`` ==
  ``1080``, ``3, 5`` == ``5, 3`` (a set), tuples/intervals/radicals are compared symbolically.

Limits and guarantees
  * Answers (and golds) longer than ``MAX_ANSWER_CHARS`` characters are never handed to
    math-verify: the verdict is ``correct=False, reason="error: answer too long (N chars > 512)"``
    and ``extracted`` holds the first 512 characters plus "…".
  * math-verify's own timeouts (``signal.alarm``, whole seconds) run inside each call; a call
    that times out gives ``reason="timeout"``, never a silent ``False``.
  * ``grade_many(workers>=1)`` adds an OUTER deadline per item (``timeout_s``, measured from
    the moment a worker starts the item, checked at least every 0.25 s): a worker past it is
    SIGKILLed and replaced, the item gets ``Verdict(False, extracted, source, "timeout")`` in
    both modes (the extraction is redone in the caller; it is linear), and the other items of
    its batch are re-queued. An item whose worker dies under it (segfault, OOM kill) is retried
    on a fresh worker; on the third death it gets ``reason="error: worker died (exit code N)"``.
    ``workers=0`` and ``grade()`` have no outer deadline: they rely on math-verify's alarms,
    which cannot interrupt a long call inside C code.
  * Workers are started with the 'forkserver' method (else 'spawn'): callers' scripts need the
    usual ``if __name__ == "__main__":`` guard. Start-up costs ~0.2-1 s per call.
  * Cost: a math-verify LaTeX parse takes ~5-20 ms, so comparison results (except timeouts) are
    cached per process by (gold, answer); rollouts of one problem repeat few answers.
    Measured on 2 shared, busy CPU cores: ~250-350 items/s for ~1.5 kB completions.

Known limitations
  * Only "answer is" phrases are recognised besides boxes: "Answer: 7", "#### 7" and a bare
    bold "**7**" count only through lenient's last number. "The answer is four." extracts
    "four", which math-verify reads as symbols: a mismatch.
  * Several boxes (``\\boxed{3}, \\boxed{5}``) give the last box only, so a multi-answer gold
    "3, 5" is graded against "5".
  * Lenient's last number may be a number from the reasoning, not the answer (that is the point
    of reporting both modes); ``.5`` (no leading digit) and unicode minus are not recognised;
    "1,234" is read as one number (thousands separator), "(3,5)" as 3 and 5.
  * "answer is X, because ..." keeps "X" only when the comma is followed by a word of two or
    more letters; otherwise the whole tail up to the sentence end is parsed.
  * Multiple-choice letters become sympy symbols (``B`` == ``(B)`` == ``\\text{(B)}``); there is
    no StringExtractionConfig handling.
"""

from __future__ import annotations

import collections
import functools
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ReasonMaxxerError

MAX_ANSWER_CHARS = 512
"""Longest extracted answer or gold (characters) that is handed to math-verify."""

_DEFAULT_INNER_TIMEOUT_S = 5  # math-verify's per-call alarm in grade() (its own default), seconds
_POOL_STARTUP_GRACE_S = 120.0  # a worker that has not said "ready" by then is killed and replaced
_MAX_ATTEMPTS = 3  # an item whose worker died this many times (not by our deadline) is an error
# Test hook, handled ONLY in pool workers (never by grade()): a completion that starts with this
# marker followed by a number of seconds makes the worker sleep that long, ignoring signals; followed
# by "exit" it makes the worker process exit at once (code 3). Tests use it to exercise the outer
# deadline and crash recovery deterministically. No real model output starts with a NUL.
_TEST_SLEEP_MARKER = "\x00reasonmaxxer-test-sleep:"


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


# ----------------------------------------------------------------------------- extraction

_BOX_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_ANSWER_IS_RE = re.compile(r"answer\s+is\b", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_COMMA_WORD_RE = re.compile(r",\s+(?=[A-Za-z]{2})")
_NUMBER_RE = re.compile(
    r"\\[dt]?frac\{-?\d+\}\{\d+\}"
    r"|(?:(?<![\w)\]}])-)?(?<![\w.])\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+)?"
)
_NUMBER_WITH_WORDS_RE = re.compile(r"(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s*(?:[A-Za-z]{2,}[\s\-']*)+")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def last_boxed(text: str) -> str | None:
    """Content (stripped) of the last-closing non-empty ``\\boxed{...}``/``\\fbox{...}``; None if none.

    Braces are balanced; escaped ``\\{``/``\\}`` are literal. With nested boxes the outer one
    closes last and wins. A box whose brace never closes is ignored. Used both to grade
    completions and to read benchmark reference solutions. One pass over the brace tokens
    with a stack: O(len(text)) time and memory.
    """
    stack: list[int] = []  # content start for a box opening, -1 for a plain "{"
    best = None
    for m in _BOX_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok[0] == "\\":
            if len(tok) == 2:  # \{ or \}: a literal brace
                continue
            stack.append(m.end())
        elif tok == "{":
            stack.append(-1)
        elif stack:
            start = stack.pop()
            end = m.start()
            # Only short spans are sliced, so nested boxes cannot make this quadratic.
            if start >= 0 and (end - start > MAX_ANSWER_CHARS or text[start:end].strip()):
                best = (start, end)
    return None if best is None else text[best[0] : best[1]].strip()


def _clean(answer: str) -> str:
    """Strip delimiters a model puts around an answer: whitespace, $, \\( \\), **, trailing '.'."""
    a = answer.strip()
    if a.startswith(":"):
        a = a[1:]
    a = _UNESCAPED_DOLLAR_RE.sub("", a).replace("**", "").strip()
    if a.startswith("\\(") and a.endswith("\\)") or a.startswith("\\[") and a.endswith("\\]"):
        a = a[2:-2].strip()
    return a.rstrip(".").strip()


def _answer_is(text: str) -> str | None:
    """The X of the last "answer is X", or None. Looks at most MAX_ANSWER_CHARS + 1 chars ahead."""
    last = collections.deque(_ANSWER_IS_RE.finditer(text), maxlen=1)
    if not last:
        return None
    start = last[0].end()
    seg = text[start : start + MAX_ANSWER_CHARS + 8].lstrip(" \t:")
    seg = seg.split("\n", 1)[0]
    m = _SENTENCE_END_RE.search(seg)
    if m:
        seg = seg[: m.start()]
    m = _COMMA_WORD_RE.search(seg)
    if m:
        seg = seg[: m.start()]
    answer = _clean(seg)
    return answer or None


def _last_number(text: str) -> str | None:
    last = collections.deque(_NUMBER_RE.finditer(text), maxlen=1)  # the deque runs in C
    return last[0].group() if last else None


def extract_answer(completion: str, mode: str = "strict") -> tuple[str | None, str | None]:
    """(answer text, source) from a completion; (None, None) when nothing is found.

    ``mode``: "strict" (last box, else "answer is X") or "lenient" (strict, else the last
    number). The text is returned in full (it may exceed MAX_ANSWER_CHARS). Linear time.
    """
    if mode not in ("strict", "lenient"):
        raise ReasonMaxxerError(f"extract_answer: mode must be 'strict' or 'lenient', got {mode!r}")
    if not isinstance(completion, str):
        raise ReasonMaxxerError(f"extract_answer: completion must be str, got {type(completion).__name__}")
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed, "boxed"
    answer = _answer_is(completion)
    if answer is not None:
        return answer, "answer_is"
    if mode == "lenient":
        number = _last_number(completion)
        if number is not None:
            return number, "last_number"
    return None, None


# ----------------------------------------------------------------------------- comparison


def _too_long(text: str) -> str | None:
    return f"error: answer too long ({len(text)} chars > {MAX_ANSWER_CHARS})" if len(text) > MAX_ANSWER_CHARS else None


def _shown(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_ANSWER_CHARS:
        return text
    return text[:MAX_ANSWER_CHARS] + "…"


def _for_math_verify(text: str) -> str:
    """Drop $ delimiters and reduce "18 dollars" to "18" (math-verify reads the words as symbols)."""
    t = _UNESCAPED_DOLLAR_RE.sub("", text).strip()
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


def _grade(gold: str, completion: str, inner_timeout: int) -> Grade:
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


def _check_item(i: int, gold, completion) -> None:
    if not isinstance(gold, str) or not isinstance(completion, str):
        raise ReasonMaxxerError(
            f"item {i}: gold and completion must be str, got {type(gold).__name__} and {type(completion).__name__}"
        )


def grade(gold: str, completion: str) -> Grade:
    """Grade one completion in the calling process (must be the main thread: math-verify uses
    signal.alarm). math-verify's own 5 s alarms apply per call; there is no outer deadline."""
    _check_item(0, gold, completion)
    if threading.current_thread() is not threading.main_thread():
        raise ReasonMaxxerError(
            "grade() must run in the main thread (math-verify uses signal.alarm); "
            "use grade_many(..., workers=1) from other threads"
        )
    return _grade(gold, completion, _DEFAULT_INNER_TIMEOUT_S)


def parse_failures(grades: Sequence[Grade]) -> dict[str, int]:
    """Number of grades with no extracted answer, per mode: {"strict": n, "lenient": n}."""
    return {
        "strict": sum(g.strict.extracted is None for g in grades),
        "lenient": sum(g.lenient.extracted is None for g in grades),
    }


# ----------------------------------------------------------------------------- process pool


def _failed_grade(completion: str, reason: str) -> Grade:
    """Both modes incorrect with ``reason``, keeping what extraction finds (done in the caller)."""
    s_text, s_src = extract_answer(completion, "strict")
    l_text, l_src = (s_text, s_src) if s_text is not None else extract_answer(completion, "lenient")
    return Grade(Verdict(False, _shown(s_text), s_src, reason), Verdict(False, _shown(l_text), l_src, reason))


def _worker_main(conn, state, inner_timeout: int) -> None:
    """Pool worker: receives (batch_id, [(gold, completion), ...]), sends (batch_id, [Grade]).

    ``state`` is shared memory [position in batch or -1, monotonic start time of that item];
    the parent reads it to enforce the per-item deadline.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    import math_verify  # noqa: F401 - import before saying ready, so start-up is not timed

    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        batch_id, items = msg
        out = []
        for k, (gold, completion) in enumerate(items):
            state[1] = time.monotonic()
            state[0] = k
            if completion.startswith(_TEST_SLEEP_MARKER):  # test hook, see _TEST_SLEEP_MARKER
                arg = completion[len(_TEST_SLEEP_MARKER) :]
                if arg == "exit":
                    os._exit(3)
                deadline = time.monotonic() + float(arg)
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            try:
                out.append(_grade(gold, completion, inner_timeout))
            except BaseException as e:  # noqa: BLE001 - any failure is reported per item
                out.append(_failed_grade(completion, f"error: {type(e).__name__}: {str(e)[:80]}"))
        state[0] = -1
        conn.send((batch_id, out))


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        try:  # add our module to the forkserver's preload list (fast worker replacement)
            from multiprocessing import forkserver

            mods = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
            missing = [m for m in (__name__, "math_verify") if m not in mods]
            if missing:
                ctx.set_forkserver_preload(mods + missing)
        except Exception:  # noqa: BLE001 - only a speed-up
            pass
        return ctx
    return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, ctx, inner_timeout: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.state = ctx.RawArray("d", [-1.0, 0.0])
        self.proc = ctx.Process(target=_worker_main, args=(child, self.state, inner_timeout), daemon=True)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.batch: list[int] | None = None
        self.batch_id = -1

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def grade_many(
    golds: Sequence[str],
    completions: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    progress: bool = False,
) -> list[Grade]:
    """Grade ``completions[i]`` against ``golds[i]`` in a pool of worker processes.

    ``workers``: processes (None = min(usable CPUs, 8)); 0 grades in this process (main thread,
    no outer deadline). ``timeout_s``: outer deadline per item, seconds from when a worker starts
    it; math-verify's inner alarms are set to max(1, floor(timeout_s / 3)) whole seconds. Items
    are sent in batches of up to 64. Returns grades in input order.
    """
    golds, completions = list(golds), list(completions)
    if len(golds) != len(completions):
        raise ReasonMaxxerError(f"grade_many: {len(golds)} golds but {len(completions)} completions")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
        raise ReasonMaxxerError(f"grade_many: timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if workers is None:
        workers = _default_workers()
    if not isinstance(workers, int) or workers < 0:
        raise ReasonMaxxerError(f"grade_many: workers must be an int >= 0, got {workers!r}")
    for i, (g, c) in enumerate(zip(golds, completions)):
        _check_item(i, g, c)
    n = len(golds)
    inner = max(1, int(timeout_s // 3))
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="grading", unit="item", disable=not progress)
    try:
        if workers == 0:
            if threading.current_thread() is not threading.main_thread():
                raise ReasonMaxxerError(
                    "grade_many(workers=0) must run in the main thread (math-verify uses signal.alarm)"
                )
            out = []
            for g, c in zip(golds, completions):
                out.append(_grade(g, c, inner))
                bar.update(1)
            return out
        return _run_pool(golds, completions, workers, float(timeout_s), inner, bar)
    finally:
        bar.close()


def _run_pool(golds, completions, workers, timeout_s, inner, bar) -> list[Grade]:
    n = len(golds)
    results: list[Grade | None] = [None] * n
    if n == 0:
        return []
    chunk = max(1, min(64, n // (workers * 8)))
    queue = collections.deque(list(range(i, min(i + chunk, n))) for i in range(0, n, chunk))
    attempts = [0] * n
    ctx = _context()
    pool = [_Worker(ctx, inner) for _ in range(min(workers, len(queue)))]
    done, next_batch_id = 0, 0
    startup_failures = [0]

    def settle(idx: int, grade_: Grade) -> None:
        nonlocal done
        if results[idx] is None:
            results[idx] = grade_
            done += 1
            bar.update(1)

    def retire(w: _Worker, why: str) -> None:
        """Kill ``w``; its in-progress item gets ``why`` (or is retried), the rest are re-queued."""
        w.kill()
        k, start = int(w.state[0]), w.state[1]
        if not w.ready and why != "timeout":
            startup_failures[0] += 1
            if startup_failures[0] > 3:
                raise ReasonMaxxerError(
                    f"grade_many: grading workers die at start-up ({why}); run with workers=0 to see why"
                )
        requeue = []
        for j, idx in enumerate(w.batch or []):
            if j == k and why == "timeout" and time.monotonic() - start >= timeout_s:
                settle(idx, _failed_grade(completions[idx], "timeout"))
            elif (j == k or k < 0) and why != "timeout":
                attempts[idx] += 1
                if attempts[idx] >= _MAX_ATTEMPTS:
                    settle(idx, _failed_grade(completions[idx], f"error: {why}"))
                else:
                    requeue.append(idx)
            else:
                requeue.append(idx)
        if requeue:
            queue.appendleft(requeue)
        pool.remove(w)
        if queue:
            pool.append(_Worker(ctx, inner))

    try:
        while done < n:
            for w in pool:
                if w.ready and w.batch is None and queue:
                    w.batch = queue.popleft()
                    w.batch_id = next_batch_id = next_batch_id + 1
                    try:
                        w.conn.send((w.batch_id, [(golds[i], completions[i]) for i in w.batch]))
                    except OSError:
                        pass  # dead; noticed below through its sentinel
            now = time.monotonic()
            wait_s = 0.25
            for w in pool:
                if w.batch is not None and w.state[0] >= 0:
                    wait_s = min(wait_s, w.state[1] + timeout_s - now)
            ready = multiprocessing.connection.wait(
                [w.conn for w in pool] + [w.proc.sentinel for w in pool], timeout=max(0.005, wait_s)
            )
            for w in list(pool):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(1)
                        retire(w, f"worker died (exit code {w.proc.exitcode})")
                        continue
                    if msg == "ready":
                        w.ready = True
                    elif msg[0] == w.batch_id:
                        for idx, g in zip(w.batch, msg[1]):
                            settle(idx, g)
                        w.batch = None
                elif w.proc.sentinel in ready:
                    w.proc.join(1)
                    retire(w, f"worker died (exit code {w.proc.exitcode})")
            now = time.monotonic()
            for w in list(pool):
                k, start = w.state[0], w.state[1]
                if w.batch is not None and k >= 0 and now - start > timeout_s:
                    retire(w, "timeout")
                elif not w.ready and now - w.started > _POOL_STARTUP_GRACE_S:
                    retire(w, "worker did not start")
    finally:
        for w in pool:
            try:
                if w.proc.is_alive() and w.batch is None and w.ready:
                    w.conn.send(None)
            except OSError:
                pass
        for w in pool:
            w.proc.join(0.5)
            w.kill()
    return results  # type: ignore[return-value]
