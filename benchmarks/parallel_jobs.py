"""Throughput of one job on every core vs one job per core, side by side in one run.

    python benchmarks/parallel_jobs.py [--problems 16] [--max-new-tokens 192] [--template verbose]

Each job is the same `reasonmaxxer eval` (the embedded default, `--n 4`, no greedy pass: the
sampling that dominates a method-study cell), in its own process and output dir. Three
measurements, one after the other, on a machine that should otherwise be idle:

1. one job with `--threads <cores>` (torch's default: every core);
2. one job with `--threads 1`;
3. `<cores>` jobs at once, `--threads 1` each.

Prints each wall time and the ratio (work per second of 3.) / (work per second of 1.):
above 1, splitting the cores between single-thread jobs gets more done than one job using
them all (e.g. the method study's cells run side by side instead of one at a time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reasonmaxxer.models import usable_cores  # noqa: E402


def eval_cmd(a, threads: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reasonmaxxer",
        "eval",
        "--model",
        a.model,
        "--problems",
        a.problems_spec,
        "--template",
        a.template,
        "--n",
        "4",
        "--no-greedy",
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--threads",
        str(threads),
        "--out",
        str(out),
    ]


def timed(cmds: list[list[str]], logs: Path) -> float:
    """Wall seconds until every command (started together) has finished, each one's output in
    its own file under `logs`; a failure stops the others and the run, printing its output's end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    logs.mkdir(parents=True, exist_ok=True)
    files = [open(logs / f"job{i}.log", "w") for i in range(len(cmds))]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env) for c, f in zip(cmds, files)]
    try:
        for p, f in zip(procs, files):
            if p.wait():
                f.close()
                tail = Path(f.name).read_text()[-2000:]
                sys.exit(f"parallel_jobs: a job failed (rc {p.returncode}):\n{tail}")
        return time.perf_counter() - t0
    finally:
        for p, f in zip(procs, files):
            if p.poll() is None:
                p.kill()
                p.wait()
            f.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=16, help="arithmetic test problems per job")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--template", default="verbose")
    ap.add_argument("--cores", type=int, default=0, help="default: the usable cores")
    a = ap.parse_args(argv)
    a.problems_spec = f"arith:test:{a.problems}:add1,addsub2,word1,word2"
    cores = a.cores or usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        timed([eval_cmd(a, 1, d / "warm")], d / "logs")  # model conversion/cache and page cache, not timed
        all_cores = timed([eval_cmd(a, cores, d / "all")], d / "logs")
        one = timed([eval_cmd(a, 1, d / "one")], d / "logs")
        split = timed([eval_cmd(a, 1, d / f"split{i}") for i in range(cores)], d / "logs")
    res = {"cores": cores, "one_job_all_threads_s": all_cores, "one_job_1_thread_s": one, "jobs_1_thread_s": split}
    res["throughput_ratio"] = cores * all_cores / split
    print(f"one job, {cores} threads: {all_cores:.1f} s")
    print(f"one job, 1 thread: {one:.1f} s ({one / all_cores:.2f}x the {cores}-thread time)")
    print(f"{cores} jobs at once, 1 thread each: {split:.1f} s")
    print(f"throughput, {cores} single-thread jobs / one {cores}-thread job: {res['throughput_ratio']:.2f}x")
    return res


if __name__ == "__main__":
    main()
