"""`reasonmaxxer train` and `calibrate` on a synthetic rollout store made with a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "reasonmaxxer.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_train_cli_scores_trains_and_exports(store_and_ckpt):
    d, ckpt = store_and_ckpt
    r = _run(
        "train",
        "--rollouts",
        str(d / "rollouts"),
        "--out",
        str(d / "run"),
        "--micro-batch",
        "4",
        "--grad-accum",
        "1",
        "--lora-rank",
        "4",
        "--tau",
        "1.0",
        "--order",
        "none",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((d / "run" / "result.json").read_text())
    assert Path(res["adapter"], "adapter_config.json").is_file() and Path(res["merged"], "config.json").is_file()
    # the store's model differs from nothing here (manifest has no fingerprint): entropies were scored
    assert (d / "run" / "scores.parquet").is_file()
    lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == res["total_steps"] and "gated_fraction" in json.loads(lines[0])


def test_calibrate_cli_reports_gated_fraction_vs_accuracy(store_and_ckpt):
    d, ckpt = store_and_ckpt
    r = _run(
        "calibrate",
        "--rollouts",
        str(d / "rollouts"),
        "--out",
        str(d / "cal"),
        "--validation",
        "arith:validation:2",
        "--template",
        "raw",
        "--taus",
        "0.5",
        "3.6",
        "99",
        "--steps",
        "1",
        "--micro-batch",
        "4",
        "--grad-accum",
        "1",
        "--lora-rank",
        "4",
        "--max-new-tokens",
        "4",
        "--order",
        "none",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((d / "cal" / "calibrate.json").read_text())
    fr = {c["tau"]: c["gated_fraction"] for c in res["candidates"]}
    assert fr[0.5] == 1.0 and 0 < fr[3.6] < 1 and fr[99.0] == 0.0  # the tiny model: entropies 2.2-4.0 nats
    assert res["best_tau"] in (0.5, 3.6) and "| 99 | 0.00% | - |" in r.stdout
