"""`reasonmaxxer train` under `accelerate launch` with 2 CPU processes (gloo) vs one process.

The same rollout store and tiny checkpoint as test_train_cli. Config: micro-batch 2 x
grad_accum 3 over 20 examples -> steps of 3, 3, 3 and 1 micro-batches, so rank 0 runs two
micro-batches and rank 1 one in the first steps (no_sync then an all-reduce), and in the last
step rank 1 runs a weight-0 pass. Micro-batches share their prompt prefix (the two-forward
shared-prefix path under DDP).

Also: scoring and validation split over 2 processes (each does its half, every process gets the
single-process result), and the process-group timeout reaching init_process_group.
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

from reasonmaxxer.backends import distributed

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
    "--validation",  # every process validates at the checkpoints (each its share of the problems)
    "arith:validation:6",
    "--max-new-tokens",
    "8",
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


# run in each process: scores the store's rows and validates on 10 problems, recording
# which rows / problems this process computed
SCRIPT = r"""
import json, sys, zlib
from pathlib import Path
import torch.distributed as td

seen = {}
_init = td.init_process_group
def _rec(*a, **k):
    seen["timeout_s"] = k["timeout"].total_seconds() if k.get("timeout") is not None else None
    return _init(*a, **k)
td.init_process_group = _rec

from reasonmaxxer.backends import distributed as D
import reasonmaxxer.stages.score as S
import reasonmaxxer.stages.evaluate as E
import reasonmaxxer.verify as V
from reasonmaxxer.data.benchmarks import load_problems
from reasonmaxxer.data.prompts import get_template
from reasonmaxxer.models import load_model
from reasonmaxxer.store import RolloutStore

store, ckpt, out = sys.argv[1:4]
D.set_timeout_minutes(7.5)
rank, world = D.rank_world()
scored, decoded = [], []
_st = S.score_tokens
def _score_tokens(rows, *a, **k):
    scored.extend([r["problem_id"], r["sample_index"]] for r in rows)
    return _st(rows, *a, **k)
S.score_tokens = _score_tokens
_gen = E.HFSampler.generate
def _generate(self, reqs, cfg, *a, **k):
    decoded.extend(r.key[0] for r in reqs)
    return _gen(self, reqs, cfg, *a, **k)
E.HFSampler.generate = _generate
class _G:  # a grade that depends on the decoded text (the tiny model never gets one right)
    def __init__(self, ok):
        self.strict = type("S", (), {"correct": ok})()
V.grade_many = lambda answers, texts, workers=None: [_G(zlib.crc32(t.encode()) % 2 == 0) for t in texts]

model, tok = load_model(ckpt)
st = RolloutStore(store)
rows = [r for r in st.read_rows() if r["sample_index"] >= 0]
rows, _ = S.attach_scores(st, rows, Path(out) / "scores.parquet", ckpt, model, tok, rescore=True, progress=False)
problems = load_problems("arith:validation:10")
acc = E.validation_accuracy_fn(problems, get_template("raw"), tok, 6, 4)(model)
res = {"world": world, "scored": scored, "decoded": decoded, "acc": acc,
       "ents": [r["base_entropies"] for r in rows], "pids": [p.id for p in problems], **seen}
if world > 1:
    res["accelerator_timeout_s"] = D.Dist.from_env().acc.init_handler.timeout.total_seconds()
Path(out, f"rank{rank}.json").write_text(json.dumps(res))
"""


def _run(script: Path, store, ckpt, out: Path, nproc: int) -> list[dict]:
    out.mkdir()
    cmd = [sys.executable, str(script), str(store), str(ckpt), str(out)]
    if nproc > 1:
        cmd[1:2] = [
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
            str(script),
        ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]


@pytest.mark.slow
def test_two_processes_split_scoring_and_validation(store_and_ckpt, tmp_path):
    d, ckpt = store_and_ckpt
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    (one,) = _run(script, d / "rollouts", ckpt, tmp_path / "one", 1)
    r0, r1 = _run(script, d / "rollouts", ckpt, tmp_path / "two", 2)
    keys = one["scored"]
    assert len(keys) == 16 and one["world"] == 1 and "timeout_s" not in one  # one process: no process group
    # rows in batches of 4 dealt round-robin: rank 0 batches 0 and 2, rank 1 batches 1 and 3
    assert r0["scored"] == keys[0:4] + keys[8:12] and r1["scored"] == keys[4:8] + keys[12:16]
    # problems in batches of 4: rank 0 decodes 0-3 and 8-9, rank 1 4-7
    pids = one["pids"]
    assert one["decoded"] == pids
    assert r0["decoded"] == pids[0:4] + pids[8:10] and r1["decoded"] == pids[4:8]
    # every process ends with the single-process entropies and accuracy
    assert r0["ents"] == r1["ents"] == one["ents"]
    assert r0["acc"] == r1["acc"] == one["acc"]
    assert 0 < one["acc"] < 1  # the stand-in grade marks some right, some wrong
    assert (tmp_path / "two" / "scores.parquet").is_file()
    # the timeout reached torch's init_process_group and the Accelerator's kwargs handler
    for r in (r0, r1):
        assert r["world"] == 2 and r["timeout_s"] == r["accelerator_timeout_s"] == 450.0


def test_sharded_map_one_process_is_a_plain_map():
    calls = []
    out = distributed.sharded_map(list(range(10)), 4, lambda b: calls.append(b) or [x * 2 for x in b])
    assert out == [x * 2 for x in range(10)] and calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_timeout_must_be_positive():
    from reasonmaxxer.errors import ReasonMaxxerError

    with pytest.raises(ReasonMaxxerError, match="dist-timeout-minutes"):
        distributed.set_timeout_minutes(0)
