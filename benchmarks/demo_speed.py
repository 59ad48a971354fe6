"""The demo's wall-clock at two commits, one after the other on this machine (issue #13 item 5).

    python benchmarks/demo_speed.py OLD [NEW]      # NEW defaults to the working tree's HEAD

Each commit is checked out in a temporary git worktree and runs ``python -m reasonmaxxer demo``
there with this interpreter (the same packages for both) from an empty run dir, so the only
difference is the code and the demo config of the commit. The embedded model's converted
checkpoint is cached once per machine and shared, so neither run pays the GGUF conversion
(run the demo once before timing). Prints, for each commit, the wall-clock of the whole
command, the per-stage times of its ``timings.json``, and the paired avg@4 difference
trained - base with its 95% bootstrap interval; then new/old. Run it on an otherwise idle
machine: both runs use all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_demo(commit: str, tmp: Path) -> dict:
    """Check out `commit` in a worktree under `tmp`, run its demo, return its timings and accuracy."""
    wt = tmp / commit.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), commit], check=True)
    try:
        env = dict(os.environ, PYTHONPATH=str(wt))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "reasonmaxxer", "demo"], cwd=wt, env=env, check=True)
        wall = time.perf_counter() - t0
        s = json.loads((wt / "runs" / "demo" / "summary.json").read_text())
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
    acc = s["accuracy"]
    return {
        "commit": commit,
        "wall_s": wall,
        "timings": s["timings"],
        "avg_at_n": acc["paired_all"]["avg_at_n"],
        "test_problems": s["summary"]["test problems"],
        "base": acc["base"]["avg_at_n"],
        "trained": acc["trained"]["avg_at_n"],
    }


def show(r: dict) -> None:
    d = r["avg_at_n"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items())
    print(f"{r['commit']}: {r['wall_s']:.0f} s in all ({stages})")
    print(
        f"  {r['test_problems']}: avg@4 {r['base']:.3f} -> {r['trained']:.3f}, "
        f"paired {d['mean_diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default="HEAD")
    a = ap.parse_args(argv)
    rev = lambda c: subprocess.run(  # noqa: E731
        ["git", "-C", str(REPO), "rev-parse", "--short", c], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="demo_speed-") as tmp:
        old = run_demo(rev(a.old), Path(tmp))
        new = run_demo(rev(a.new), Path(tmp))
    show(old)
    show(new)
    print(f"new/old wall-clock: {new['wall_s'] / old['wall_s']:.2f}")


if __name__ == "__main__":
    main()
