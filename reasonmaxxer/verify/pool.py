"""Grading in a pool of worker processes with a per-item outer deadline (see `reasonmaxxer.verify`).

`grade_many` sends batches of items to workers (`_worker_main`); `_Pool` watches them: a
worker past an item's deadline is killed and replaced, the item gets "timeout" and the rest
of its batch is re-queued; an item whose worker dies under it is retried, up to
`_MAX_ATTEMPTS` deaths.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Sequence

from ..errors import ReasonMaxxerError
from .grading import Grade, check_item, failed_grade, grade_one

_POOL_STARTUP_GRACE_S = 120.0  # a worker that has not said "ready" by then is killed and replaced
_MAX_ATTEMPTS = 3  # an item whose worker died this many times (not by our deadline) is an error
# Test hook, handled ONLY in pool workers (never by grade()): a completion that starts with this
# marker followed by a number of seconds makes the worker sleep that long, ignoring signals; followed
# by "exit" it makes the worker process exit at once (code 3). Tests use it to exercise the outer
# deadline and crash recovery deterministically. No real model output starts with a NUL.
TEST_SLEEP_MARKER = "\x00reasonmaxxer-test-sleep:"


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
            if completion.startswith(TEST_SLEEP_MARKER):  # test hook, see TEST_SLEEP_MARKER
                arg = completion[len(TEST_SLEEP_MARKER) :]
                if arg == "exit":
                    os._exit(3)
                deadline = time.monotonic() + float(arg)
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            try:
                out.append(grade_one(gold, completion, inner_timeout))
            except BaseException as e:  # noqa: BLE001 - any failure is reported per item
                out.append(failed_grade(completion, f"error: {type(e).__name__}: {str(e)[:80]}"))
        state[0] = -1
        conn.send((batch_id, out))


def _context():
    """A 'forkserver' context preloading this module and math_verify, else 'spawn'."""
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
    """One worker process, its pipe and shared state [item position or -1, its start time], and its batch."""

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
        """Kill the process (if alive), reap it and close the pipe."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _default_workers() -> int:
    """min(usable CPUs, 8), at least 1."""
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
        check_item(i, g, c)
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
                out.append(grade_one(g, c, inner))
                bar.update(1)
            return out
        return _run_pool(golds, completions, workers, float(timeout_s), inner, bar)
    finally:
        bar.close()


def _run_pool(golds, completions, workers, timeout_s, inner, bar) -> list[Grade]:
    """Grade every item on `workers` processes (`_Pool`); grades in input order."""
    n = len(golds)
    if n == 0:
        return []
    pool = _Pool(golds, completions, workers, timeout_s, inner, bar)
    try:
        while pool.done < n:
            pool.dispatch()
            pool.receive()
            pool.enforce_deadlines()
    finally:
        pool.shutdown()
    return pool.results  # type: ignore[return-value]


class _Pool:
    """The worker processes of one `grade_many` call, the queue of batches (lists of item
    indices) they take from, and the grades settled so far (`results`, `done`)."""

    def __init__(self, golds, completions, workers: int, timeout_s: float, inner: int, bar):
        n = len(golds)
        self.golds, self.completions, self.timeout_s, self.inner, self.bar = golds, completions, timeout_s, inner, bar
        self.results: list[Grade | None] = [None] * n
        chunk = max(1, min(64, n // (workers * 8)))
        self.queue = collections.deque(list(range(i, min(i + chunk, n))) for i in range(0, n, chunk))
        self.attempts = [0] * n
        self.ctx = _context()
        self.workers = [_Worker(self.ctx, inner) for _ in range(min(workers, len(self.queue)))]
        self.done, self.next_batch_id = 0, 0
        self.startup_failures = 0

    def settle(self, idx: int, grade_: Grade) -> None:
        """Record item `idx`'s grade (the first one wins)."""
        if self.results[idx] is None:
            self.results[idx] = grade_
            self.done += 1
            self.bar.update(1)

    def retire(self, w: _Worker, why: str) -> None:
        """Kill ``w``; its in-progress item gets ``why`` (or is retried), the rest are re-queued."""
        w.kill()
        k, start = int(w.state[0]), w.state[1]
        if not w.ready and why != "timeout":
            self.startup_failures += 1
            if self.startup_failures > 3:
                raise ReasonMaxxerError(
                    f"grade_many: grading workers die at start-up ({why}); run with workers=0 to see why "
                    "(workers are spawned: a script that grades needs an `if __name__ == '__main__':` guard)"
                )
        requeue = []
        for j, idx in enumerate(w.batch or []):
            if j == k and why == "timeout" and time.monotonic() - start >= self.timeout_s:
                self.settle(idx, failed_grade(self.completions[idx], "timeout"))
            elif (j == k or k < 0) and why != "timeout":
                self.attempts[idx] += 1
                if self.attempts[idx] >= _MAX_ATTEMPTS:
                    self.settle(idx, failed_grade(self.completions[idx], f"error: {why}"))
                else:
                    requeue.append(idx)
            else:
                requeue.append(idx)
        if requeue:
            self.queue.appendleft(requeue)
        self.workers.remove(w)
        if self.queue:
            self.workers.append(_Worker(self.ctx, self.inner))

    def dispatch(self) -> None:
        """Send the next queued batch to every ready, idle worker."""
        for w in self.workers:
            if w.ready and w.batch is None and self.queue:
                w.batch = self.queue.popleft()
                w.batch_id = self.next_batch_id = self.next_batch_id + 1
                try:
                    w.conn.send((w.batch_id, [(self.golds[i], self.completions[i]) for i in w.batch]))
                except OSError:
                    pass  # dead; noticed below through its sentinel

    def receive(self) -> None:
        """Wait (at most 0.25 s, or until the nearest item deadline) for messages and deaths and
        handle them: "ready", a finished batch's grades, a dead worker (retired)."""
        now = time.monotonic()
        wait_s = 0.25
        for w in self.workers:
            if w.batch is not None and w.state[0] >= 0:
                wait_s = min(wait_s, w.state[1] + self.timeout_s - now)
        ready = multiprocessing.connection.wait(
            [w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers], timeout=max(0.005, wait_s)
        )
        for w in list(self.workers):
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    w.proc.join(1)
                    self.retire(w, f"worker died (exit code {w.proc.exitcode})")
                    continue
                if msg == "ready":
                    w.ready = True
                elif msg[0] == w.batch_id:
                    for idx, g in zip(w.batch, msg[1]):
                        self.settle(idx, g)
                    w.batch = None
            elif w.proc.sentinel in ready:
                w.proc.join(1)
                self.retire(w, f"worker died (exit code {w.proc.exitcode})")

    def enforce_deadlines(self) -> None:
        """Retire a worker past its item's deadline, or one not started within the grace period."""
        now = time.monotonic()
        for w in list(self.workers):
            k, start = w.state[0], w.state[1]
            if w.batch is not None and k >= 0 and now - start > self.timeout_s:
                self.retire(w, "timeout")
            elif not w.ready and now - w.started > _POOL_STARTUP_GRACE_S:
                self.retire(w, "worker did not start")

    def shutdown(self) -> None:
        """Ask idle workers to exit, then kill and reap every worker."""
        for w in self.workers:
            try:
                if w.proc.is_alive() and w.batch is None and w.ready:
                    w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.proc.join(0.5)
            w.kill()
