"""The method study (issue 13): does ReasonMaxxer beat RFT, GRPO and its own ablations, and where?

    python benchmarks/method_study.py --plan                  # the cells, and which are done
    python benchmarks/method_study.py                         # run what is missing, then aggregate
    python benchmarks/method_study.py --aggregate-only        # the table and plot from finished cells
    python benchmarks/method_study.py --methods rft --seeds 1 # one method's seed (its 2x/4x cells
                                                              # run for --budget-seeds in --seeds)
    python benchmarks/method_study.py --methods reasonmaxxer rft --seeds 0 --data-seeds 1 2 --jobs 2
                                                              # the data replicates, two cells at once

Resumable by construction: each cell is a `reasonmaxxer run` (or `reasonmaxxer baseline`)
directory under ``--root`` (default ``runs/method_study``); a done cell (run finished, transfer
column evaluated) is skipped, a cell stopped between the two resumes at its transfer evaluation,
a cell cut short resumes where its stages stopped (every stage of `run` is resumable; a GRPO run is
checkpointed every 10 steps), so the study can be stopped at any point (Ctrl-C, end of a
session) and continued later. After each cell the results are aggregated into
``benchmarks/results/method_study.json`` (commit it), with a markdown table
(``method_study.md``) and ``accuracy_vs_flops.png``.

The design (regimes, methods, budgets, seeds; ``--plan`` prints the cells) is
`method_study_design.py`; the aggregation, `method_study_results.py`. Cells whose results are
committed are skipped in a later session (``runs/`` is not committed); only the first cell
(ReasonMaxxer seed 0, whose base stores the others reuse) is re-run when its directory is
missing and the regime has no base pack yet; once it finishes, its base stores are copied to
``benchmarks/results/method_study_base/<regime>/`` (commit it with the results), and later
sessions' cells reuse that pack instead (`method_study_design.base_source`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from filelock import FileLock, Timeout

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study's sibling modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from method_study_design import (  # noqa: E402
    BASELINES,
    BUDGETS,
    DATA_SEEDS,
    METHODS,
    PACK_FILES,
    PENDING,
    REGIMES,
    ROOT,
    SEEDS,
    base_source,
    baseline_cell_config,
    cell_config,
    cell_dir,
    cell_log,
    cells,
    done,
    finished,
    pack_dir,
    sampling_sibling,
    stored_name,
)
from method_study_results import aggregate, markdown, reference_flops, save, stored_cells  # noqa: E402

from reasonmaxxer.io import atomic_dir  # noqa: E402
from reasonmaxxer.models import usable_cores  # noqa: E402

CHILDREN: set[subprocess.Popen] = set()  # the commands running now (`stop_all`)
STOPPING = threading.Event()  # set by `stop_all`: no command starts after it
_CHILDREN_LOCK = threading.Lock()


def call(cmd: list[str], threads: int = 0, log=None) -> None:
    """Run one `reasonmaxxer` command from the checkout with `--threads threads` (0: torch's
    default); its output to `log` (a file) or ours. Interrupted, it stops the command first."""
    cmd = cmd + (["--threads", str(threads)] if threads else [])
    with _CHILDREN_LOCK:
        if STOPPING.is_set():
            raise RuntimeError("method_study: stopping; not starting " + " ".join(cmd[2:4]))
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log else None)
        CHILDREN.add(p)
    try:
        rc = p.wait()
    except BaseException:
        terminate([p])
        raise
    finally:
        CHILDREN.discard(p)
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def terminate(procs) -> None:
    """Terminate the commands `procs` (SIGTERM, then SIGKILL after 30 s) and wait for them."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all() -> None:
    """Stop every running command, and start none after this (cells running in other threads)."""
    with _CHILDREN_LOCK:
        STOPPING.set()
        procs = list(CHILDREN)
    terminate(procs)


def run_cell(cell: dict, root: Path, first: Path, threads: int, log=None) -> float:
    d = cell_dir(cell, root)
    d.mkdir(parents=True, exist_ok=True)
    if cell["method"] in BASELINES:
        return run_baseline_cell(cell, d, first, threads, log)
    cfg = d.parent / f"{cell['name']}.toml"
    cfg.write_text(cell_config(cell, root, first))
    t0 = time.time()
    cmd = [sys.executable, "-m", "reasonmaxxer", "run", str(cfg)]
    if not finished(cell, d):  # else only its transfer evaluation is missing
        call(cmd, threads, log)
    transfer(cell, d, first, threads, log)
    return time.time() - t0


def run_baseline_cell(cell: dict, d: Path, first: Path, threads: int, log=None) -> float:
    """`reasonmaxxer baseline` on the regime's problems (the prompt, model and lengths of the
    ReasonMaxxer cells), capped at the largest budget and evaluated at the others."""
    reg, ref = REGIMES[cell["regime"]], reference_flops(first, cell["regime"])
    rc = json.loads((first / "run_config.json").read_text())
    cfg = d.parent / f"{cell['name']}.toml"
    cfg.write_text(baseline_cell_config(rc["eval"], cell["regime"]))  # evaluated as the ReasonMaxxer cells are
    t0 = time.time()
    cmd = [sys.executable, "-m", "reasonmaxxer", "baseline", BASELINES[cell["method"]], "--out", str(d)]
    cmd += ["--config", str(cfg)]
    cmd += ["--model", rc["model"], "--template", rc["template"], "--seed", str(cell["seed"])]
    cmd += ["--train-problems", reg["train_problems"], "--test-problems", reg["test_problems"]]
    cmd += ["--max-new-tokens", str(rc["sampling"]["max_new_tokens"]), "--max-steps", "100000", "--eval-every", "0"]
    cmd += ["--max-train-flops", repr(BUDGETS[-1] * ref), "--eval-at-flops"] + [repr(b * ref) for b in BUDGETS[:-1]]
    if not finished(cell, d):  # else only its transfer evaluation is missing
        call(cmd, threads, log)
    transfer(cell, d, first, threads, log)
    return time.time() - t0


def transfer(cell: dict, d: Path, first: Path, threads: int = 0, log=None) -> None:
    """The trained model (and, once, the base) on the transfer family: `reasonmaxxer eval`."""
    reg, (template, max_new) = REGIMES[cell["regime"]], prompt_of(d, first)
    trained = d / "adapter" if cell["method"] in BASELINES else d / "train" / "merged"
    copy_tree(first / "transfer_base", d.parent / "transfer_base")  # from the base pack, if it is one
    for name, model in (("transfer", trained), ("transfer_base", None)):
        out = d / name if name == "transfer" else d.parent / "transfer_base"
        if (out / "eval.json").is_file():
            continue
        spec = str(model) if model else model_of(d)
        cmd = [sys.executable, "-m", "reasonmaxxer", "eval", "--model", spec, "--problems", reg["transfer_problems"]]
        cmd += ["--template", template, "--n", "4", "--temperature", "0.7", "--max-new-tokens", str(max_new)]
        cmd += ["--greedy", "--out", str(out)]
        call(cmd, threads, log)


LOCKS = shutil.ignore_patterns("*.lock")  # a store's lock files stay behind


def copy_tree(src: Path, dst: Path) -> bool:
    """Copy the directory `src` to `dst` (`io.atomic_dir`) when `src` is there and `dst` is not
    (a copy that another cell, running beside this one, finished first is kept); returns whether
    it copied."""
    if not src.is_dir() or dst.exists():
        return False
    atomic_dir(dst, lambda tmp: shutil.copytree(src, tmp, ignore=LOCKS, dirs_exist_ok=True), replace=False)
    return True


def export_pack(first: Path, regime: str) -> Path | None:
    """Copy what the other cells read from the finished first cell `first` (`PACK_FILES`, and the
    regime's transfer base evaluation) to the regime's base pack, once; returns the pack when it
    wrote it. Commit it: a later session's cells reuse it instead of re-running the first cell."""
    pack = pack_dir(regime)
    if (
        pack.exists()
        or not (first / "summary.json").is_file()
        or not (first.parent / "transfer_base" / "eval.json").is_file()
    ):
        return None  # there already, or the first cell (its run, the transfer base evaluation) not complete

    def fill(tmp: Path) -> None:
        for rel in PACK_FILES:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if (first / rel).is_dir():
                shutil.copytree(first / rel, tmp / rel, ignore=LOCKS)
            else:
                shutil.copy2(first / rel, tmp / rel)
        shutil.copytree(first.parent / "transfer_base", tmp / "transfer_base", ignore=LOCKS)  # checked above

    return atomic_dir(pack, fill)


def prompt_of(d: Path, first: Path) -> tuple[str, int]:
    """(template, eval max_new_tokens) of a cell's regime, from its run config or, for a
    baseline cell, from the regime's first cell (ReasonMaxxer seed 0)."""
    rc = d / "run_config.json"
    cfg = json.loads((rc if rc.is_file() else first / "run_config.json").read_text())
    return cfg["template"], cfg["eval"]["max_new_tokens"]


def model_of(d: Path) -> str:
    """The base model of a cell: a `run` dir's or a `baseline` dir's."""
    if (d / "run_config.json").is_file():
        return json.loads((d / "run_config.json").read_text())["model"]
    return json.loads((d / "baseline_config.json").read_text())["baseline"]["model"]


def study_lock(root: Path, regime: str) -> FileLock:
    """Hold `root/.<regime>.lock`: a second study process on the same cells (another terminal, a
    session resumed while the first still runs) stops with one line instead of running the same
    cell twice into one run dir."""
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / f".{regime}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SystemExit(
            f"method_study: another process is running the {regime} cells under {root} "
            f"(it holds {lock.lock_file}); wait for it, or stop it and run again to resume"
        ) from None
    return lock


def stale(cell: dict, d: Path, src: Path) -> str | None:
    """What the run in the cell's dir `d` was made with that the cell's config, resolved as `run`
    resolves it (the regime's config file it extends and the library's defaults included), now
    sets otherwise ("selection.seed 0, now 1"), or None: a dir of an earlier design, or made before
    a config file or default changed, is not taken for this cell's. A key the run did not record
    (one added since) and a value `run` fills in (``tau = "calibrate"``) are not held against it."""
    import tempfile

    from reasonmaxxer.config import load_run_config
    from reasonmaxxer.recipes.run import run_config_dict

    rc = d / "run_config.json"
    if cell["method"] in BASELINES or not rc.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cell.toml").write_text(cell_config(cell, d.parent.parent, src))
        now = run_config_dict(load_run_config(Path(tmp) / "cell.toml"))
    made = json.loads(rc.read_text())
    return config_change(made, now)


def config_change(made: dict, now: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value in `now` differs from `made`'s, as "key old, now new";
    None when none does. Keys `made` lacks, what `run_cell` sets per call (the run's own paths
    `out` and `reuse`, `--threads`) and values `run` fills in (``"calibrate"``) are skipped."""
    for key, want in now.items():
        if key not in made or key in ("out", "reuse", "threads") or want == "calibrate":
            continue
        if isinstance(want, dict) and isinstance(made[key], dict):
            why = config_change(made[key], want, f"{prefix}{key}.")
            if why:
                return why
        elif made[key] != want:
            return f"{prefix}{key} {made[key]!r}, now {want!r}"
    return None


def cell_state(cell: dict, d: Path, carried: set[str], src: Path) -> str:
    """ "done"; "transfer eval left" (its run finished, resumed there); "stored" (its row committed
    by an earlier session, its dir not here: skipped); "stale: ..." (its dir holds a run made with
    another config: `stale`); or "todo"."""
    why = stale(cell, d, src)
    if why:
        return f"stale: {why}"
    if done(cell, d):
        return "done"
    if finished(cell, d):
        return "transfer eval left"
    return "stored" if stored_name(cell) in carried and d != src else "todo"


def waits_for(cell: dict, root: Path, src: Path) -> set[Path]:
    """The dirs whose stores `cell` copies: `src` (the first cell's run dir, or the base pack,
    which no cell is) and its `sampling_sibling`'s run dir."""
    return {src, sampling_sibling(cell, root)} - {None, cell_dir(cell, root)}


def run_cells(pending: list[dict], root: Path, src: Path, threads: int, jobs: int, alone_threads: int = 0):
    """Run the `pending` cells (in order), yielding (cell, seconds) as each finishes. `jobs` > 1:
    that many at once, each with `threads` torch threads and its output in ``<cell>.log`` beside
    its dir; a cell starts only after the cells whose stores it copies (`waits_for`), of the cells
    ready the one most queued cells wait for first (no slot idles behind a cell started late), and one
    that runs alone (the others wait for it) gets `alone_threads` (0: torch's default). A failed
    cell lets the ones beside it finish, starts no other, then raises; an interrupt (or the
    caller stopping) stops the running commands."""
    if jobs == 1:
        for c in pending:
            print(f"== cell {c['regime']}/{c['name']} ==", flush=True)
            yield c, run_cell(c, root, src, alone_threads)
        return
    queue, running, failed = list(pending), {}, None

    def startable(busy: list[dict]) -> list[dict]:
        dirs = {cell_dir(c, root) for c in busy}
        return [c for c in queue if not waits_for(c, root, src) & (dirs - {cell_dir(c, root)})]

    def waited_on(c: dict) -> int:
        return sum(cell_dir(c, root) in waits_for(q, root, src) for q in queue)

    def one(c: dict, n: int) -> float:
        with open(cell_log(c, root), "a") as log:
            return run_cell(c, root, src, n, log)

    with ThreadPoolExecutor(jobs) as ex:
        try:
            while queue or running:
                while len(running) < jobs and (ready := startable(queue + list(running.values()))):
                    c = max(ready, key=waited_on)  # the first of those most queued cells wait for
                    queue.remove(c)
                    n = alone_threads if not running and not startable(queue + [c]) else threads  # alone: all
                    log = cell_log(c, root)
                    log.parent.mkdir(parents=True, exist_ok=True)
                    # printed here, not in the worker: the lines come in the order the cells start
                    print(
                        f"== cell {c['regime']}/{c['name']} started, {n or 'all'} threads (log: {log}) ==", flush=True
                    )
                    running[ex.submit(one, c, n)] = c
                if not running:  # every queued cell waits for another queued one (a cycle: a design bug)
                    raise RuntimeError(f"method_study: no cell can start: {[c['name'] for c in queue]}")
                for f in wait(running, return_when=FIRST_COMPLETED)[0]:
                    c = running.pop(f)
                    if f.exception() is None:
                        yield c, f.result()
                        continue
                    log_path = cell_log(c, root)
                    print(f"== cell {c['regime']}/{c['name']} failed: {f.exception()} (log: {log_path}) ==", flush=True)
                    queue.clear()  # start nothing more; the running cells finish, then it raises
                    failed = failed or f
        except BaseException:  # an interrupt, or the caller stopped (GeneratorExit): no cell keeps running
            queue.clear()
            stop_all()
            raise
    if failed is not None:
        failed.result()


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regime", default="short", choices=tuple(REGIMES))
    every = tuple(METHODS) + tuple(BASELINES)
    ap.add_argument("--methods", nargs="+", default=list(every), choices=every)
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--baseline-seeds", nargs="+", type=int, default=[0], help="seeds of the GRPO cells")
    ap.add_argument(
        "--budget-seeds",
        nargs="*",
        type=int,
        default=[0],
        help="seeds of the offline 2x/4x cells (those also in --seeds run; none: the flag alone)",
    )
    ap.add_argument(
        "--data-seeds",
        nargs="*",
        type=positive,
        default=list(DATA_SEEDS),
        help="data replicates k >= 1 of ReasonMaxxer, RFT, positive_only and random_reward (those in --methods): "
        "rollouts sampled with seed + k (with seed 0 in --seeds; none: the flag alone)",
    )
    ap.add_argument("--root", default=str(ROOT / "runs" / "method_study"))
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: torch's default, or cores / --jobs)"
    )
    ap.add_argument("--jobs", type=positive, default=1, help="cells run at once (on 2 cores, 2: see parallel_jobs.py)")
    ap.add_argument("--plan", action="store_true", help="print the cells and which are done; run nothing")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--max-cells", type=int, default=0, help="stop after this many new cells (0: all)")
    a = ap.parse_args(argv)
    root = Path(a.root)
    study = (a.regime, a.seeds, a.methods, a.baseline_seeds, a.budget_seeds, a.data_seeds)
    todo = cells(*study)
    carried = stored_cells(a.regime)  # finished in an earlier session
    first = cell_dir(todo[0], root)
    src = base_source(a.regime, todo[0], first, carried)  # the first cell's stores: its dir or the pack
    if a.plan:
        print(f"base stores from {src}")
        for c in todo:
            print(f"{cell_state(c, cell_dir(c, root), carried, src)}  {a.regime}/{c['name']}")
        print("not in the study yet:\n  " + "\n  ".join(PENDING))
        return {}
    # once, for the stale check and the run (a cell another process finishes meanwhile re-runs as a no-op)
    states = {c["name"]: cell_state(c, cell_dir(c, root), carried, src) for c in todo}
    bad = [f"{cell_dir(c, root)}: {states[c['name']]}" for c in todo if states[c["name"]].startswith("stale")]
    if bad:
        raise SystemExit(
            "method_study: run dirs made with another config than their cell's (move them aside to re-run "
            "the cells):\n  " + "\n  ".join(bad)
        )
    if not a.aggregate_only:
        threads = a.threads or max(1, usable_cores() // a.jobs)  # a cell beside others
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: the running commands stop too
        with study_lock(root, a.regime):  # one process runs a regime's cells (`--jobs` of them at once)
            pending = [c for c in todo if states[c["name"]] not in ("done", "stored")][: a.max_cells or None]
            for c, dt in run_cells(pending, root, src, threads, a.jobs, alone_threads=a.threads):
                print(f"== cell {a.regime}/{c['name']} done in {dt:.0f} s ==", flush=True)
                if export_pack(first, a.regime):
                    print(f"== base pack of {a.regime}: {pack_dir(a.regime)} (commit it) ==", flush=True)
                save(*aggregate(root, *study, source=src))
    res, probs = aggregate(root, *study, source=src)
    save(res, probs)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
