"""Rollout store: atomic shards, manifests, resumption, and a real SIGKILL mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.io import config_hash
from reasonmaxxer.store import BUSY, DONE, MINE, RolloutStore, ShardClaims

ROOT = Path(__file__).resolve().parents[1]


def _row(pid, s):
    return {
        "problem_id": pid,
        "sample_index": s,
        "prompt": "p",
        "prompt_ids": [1, 2],
        "completion": "c",
        "token_ids": [3],
        "logprobs": [-0.5],
        "entropies": [1.0],
        "finish_reason": "eos",
        "truncated": False,
        "gold": "1",
        "reward": 1.0,
        "strict_correct": True,
        "strict_extracted": "1",
        "lenient_correct": True,
        "lenient_extracted": "1",
        "grade_reason": "match",
    }


def test_open_resume_and_mismatch(tmp_path):
    st = RolloutStore(tmp_path / "s")
    st.open({"a": 1})
    st.write_shard(0, [_row("x", 0), _row("x", 1)])
    assert st.done_shards() == {0}
    # same config: reopened, shard kept
    RolloutStore(tmp_path / "s").open({"a": 1})
    assert st.done_shards() == {0} and len(st.read_rows()) == 2
    # different config: refused, nothing lost
    with pytest.raises(ReasonMaxxerError, match="different inputs"):
        RolloutStore(tmp_path / "s").open({"a": 2})
    assert st.done_shards() == {0}
    m = st.manifest()
    assert m["config_hash"] == config_hash({"a": 1}) and "torch" in m["versions"]
    # overwrite: old shards gone
    RolloutStore(tmp_path / "s").open({"a": 2}, overwrite=True)
    assert st.done_shards() == set()


def test_copy_from_copies_only_a_store_made_with_the_same_inputs(tmp_path):
    """`reuse`: another run's store is copied when its config hash is this run's, never over an
    existing store, and a mismatch (other problems, other sampling) copies nothing."""
    src = RolloutStore(tmp_path / "src")
    src.open({"a": 1})
    src.write_shard(0, [_row("x", 0)])
    assert not RolloutStore(tmp_path / "other").copy_from(src.root, {"a": 2})
    assert not (tmp_path / "other").exists()
    assert not RolloutStore(tmp_path / "other").copy_from(tmp_path / "missing", {"a": 1})
    mine = RolloutStore(tmp_path / "mine")
    assert mine.copy_from(src.root, {"a": 1})
    assert mine.open({"a": 1})["config_hash"] == config_hash({"a": 1}) and mine.done_shards() == {0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "src"]  # no temp dir left
    stale = RolloutStore(tmp_path / "stale")  # the dir (and lock) of a store never opened
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "manifest.lock").write_text("")
    assert stale.copy_from(src.root, {"a": 1}) and stale.done_shards() == {0}
    mine.write_shard(1, [_row("y", 0)])
    assert not mine.copy_from(src.root, {"a": 1})  # an existing store is never replaced
    assert mine.done_shards() == {0, 1}


def test_no_temp_files_left_and_corrupt_manifest_is_named(tmp_path):
    st = RolloutStore(tmp_path / "s")
    st.open({"a": 1})
    st.write_shard(3, [_row("x", 0)])
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == ["shard-00003.parquet"]
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(ReasonMaxxerError, match=r"manifest.json:1: corrupt manifest"):
        st.manifest()


def test_shard_claims_and_a_killed_holder(tmp_path):
    """A held shard is BUSY to another process; once the holder is SIGKILLed its lock file
    stays but the OS lock is gone, so the shard can be claimed; a written shard is DONE."""
    st = RolloutStore(tmp_path / "s")
    st.open({"a": 1})
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from reasonmaxxer.store import RolloutStore, ShardClaims; "
            f"c = ShardClaims(RolloutStore({str(st.root)!r})); assert c.claim(0) == 'mine'; "
            "print('held', flush=True); time.sleep(120)",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        claims = ShardClaims(st)
        assert claims.claim(0) == BUSY and claims.held == set()
        assert claims.claim(1) == MINE and claims.held == {1}
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert st.shard_lock_path(0).is_file()
    assert claims.claim(0, wait=True) == MINE
    st.write_shard(0, [_row("x", 0)])
    claims.release_all()
    assert claims.claim(0) == DONE and claims.held == set()
    assert st.done_shards() == {0}  # lock files are not shards


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("probs")
    p = d / "probs.jsonl"
    p.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
            for i in range(8)
        )
    )
    return p


def _sample_cmd(ckpt, probs, out):
    return [
        sys.executable,
        "-m",
        "reasonmaxxer.cli",
        "sample",
        "--model",
        str(ckpt),
        "--problems",
        str(probs),
        "--template",
        "raw",
        "--n",
        "3",
        "--max-new-tokens",
        "48",
        "--batch-size",
        "4",
        "--shard-size",
        "1",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "--grade-workers",
        "0",
        "--out",
        str(out),
    ]


def _env():
    env = dict(
        os.environ, REASONMAXXER_CACHE=str(ROOT / ".pytest_cache" / "rmx"), TQDM_DISABLE="1", OMP_NUM_THREADS="1"
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_mid_run_resumes_to_the_same_result(tmp_path, tiny_ckpt, problem_file):
    ref = tmp_path / "ref"
    r = subprocess.run(
        _sample_cmd(tiny_ckpt, problem_file, ref), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _sample_cmd(tiny_ckpt, problem_file, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        shards = list((killed / "shards").glob("shard-*.parquet")) if (killed / "shards").is_dir() else []
        if len(shards) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = RolloutStore(killed).done_shards()
    assert 3 <= len(done_before) < 8, "the kill should land mid-run"
    assert len(list((killed / "shards").glob("*.lock"))) >= len(done_before)  # left behind
    for p in (killed / "shards").glob("shard-*.parquet"):  # every file on disk is a complete shard
        pq.read_table(p)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (killed / "shards").glob("shard-*.parquet")}
    r = subprocess.run(
        _sample_cmd(tiny_ckpt, problem_file, killed), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    for name, mt in mtimes.items():  # finished shards were not redone
        assert (killed / "shards" / name).stat().st_mtime_ns == mt
    a = RolloutStore(ref).read_rows()
    b = RolloutStore(killed).read_rows()
    assert len(a) == len(b) == 24
    assert [(x["problem_id"], x["sample_index"], x["token_ids"]) for x in a] == [
        (x["problem_id"], x["sample_index"], x["token_ids"]) for x in b
    ]
    assert not list(killed.rglob("*.tmp"))
    # a third run with the same inputs is a no-op
    r = subprocess.run(
        _sample_cmd(tiny_ckpt, problem_file, killed), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "0 tokens generated" in r.stdout


def test_two_processes_split_one_store(tmp_path, tiny_ckpt, problem_file):
    """Two `sample` processes on one store with the same inputs: both succeed, each shard is
    computed once (the manifest's engine_runs count the shards each process computed), and
    the store equals a single process's."""
    ref, shared = tmp_path / "ref", tmp_path / "shared"
    r = subprocess.run(
        _sample_cmd(tiny_ckpt, problem_file, ref), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    procs = [
        subprocess.Popen(
            _sample_cmd(tiny_ckpt, problem_file, shared),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    m = RolloutStore(shared).manifest()
    runs = m["engine_runs"]
    assert len(runs) == 2 and sum(run["shards"] for run in runs) == 8, runs
    assert sorted(m["shards"]) == [f"{i:05d}" for i in range(8)] and m["complete"] is True
    a = RolloutStore(ref).read_rows()
    b = RolloutStore(shared).read_rows()
    assert len(b) == 24 and a == b
    assert sorted(p.name for p in (shared / "shards").glob("*.lock")) == [f"{i:05d}.lock" for i in range(8)]
    assert not list(shared.rglob("*.tmp"))
