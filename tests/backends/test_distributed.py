"""`reasonmaxxer train` under `accelerate launch` with 2 CPU processes (gloo) vs one process.

The same rollout store and tiny checkpoint as test_train_cli. Config: micro-batch 2 x
grad_accum 3 over 20 examples -> steps of 3, 3, 3 and 1 micro-batches, so rank 0 runs two
micro-batches and rank 1 one in the first steps (no_sync then an all-reduce), and in the last
step rank 1 runs a weight-0 pass. Micro-batches share their prompt prefix (the two-forward
shared-prefix path under DDP).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DDP_YAML = ROOT / "reasonmaxxer" / "configs" / "accelerate" / "ddp.yaml"
TOL = 1e-5  # max |diff| of an adapter weight, 2 processes vs 1 (measured: see the README)
ARGS = [
    "--micro-batch",
    "2",
    "--grad-accum",
    "3",
    "--epochs",
    "1.25",
    "--lora-rank",
    "4",
    "--lr",
    "1e-3",
    "--tau",
    "1.0",
    "--order",
    "none",
    "--checkpoint-every",
    "2",
    "--warmup-steps",
    "1",
]


def _env():
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(store, out, nproc: int):
    """`python -m reasonmaxxer train` in one process, or under `accelerate launch` with nproc."""
    cmd = [sys.executable, "-m", "reasonmaxxer", "train", "--rollouts", str(store), "--out", str(out), *ARGS]
    if nproc > 1:
        # the shipped DDP config; with no GPU visible the processes run on the CPU over gloo
        cmd[1:3] = [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(DDP_YAML),
            "--num_processes",
            str(nproc),
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "reasonmaxxer",
        ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one(store_and_ckpt):  # noqa: F811
    d, _ = store_and_ckpt
    one, two = d / "ddp-1", d / "ddp-2"
    _train(d / "rollouts", one, 1)
    r = _train(d / "rollouts", two, 2)
    assert r.stdout.count("adapter:") == 1  # one process reports
    a, b = _adapter(one), _adapter(two)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # it trained
    diff = _max_diff(a, b)
    print(f"max |adapter diff| 2 processes vs 1: {diff:.3g}")
    assert diff < TOL, diff
    # one set of files: a metrics line per step, the checkpoints once, no temp files
    res = json.loads((two / "result.json").read_text())
    assert res["total_steps"] == 4 and res == {
        **json.loads((one / "result.json").read_text()),
        "train_seconds": res["train_seconds"],
        "adapter": res["adapter"],
        "merged": res["merged"],
    }
    steps = [json.loads(l)["step"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    m1 = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(m1, m2):  # step totals summed over the processes = the single-process ones
        assert (x["gated_tokens"], x["anchor_tokens"]) == (y["gated_tokens"], y["anchor_tokens"])
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest.json", "step-000002", "step-000004"]
    assert Path(res["merged"], "config.json").is_file()

    # resume: as if killed after the step-2 checkpoint, then relaunched with 2 processes
    shutil.rmtree(two / "checkpoints" / "step-000004")
    for name in ("adapter", "merged"):
        shutil.rmtree(two / name)
    (two / "result.json").unlink()
    (two / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    r = _train(d / "rollouts", two, 2)
    assert "resuming from step-000002" in r.stdout
    assert _max_diff(b, _adapter(two)) == 0.0
    assert [json.loads(l)["step"] for l in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
