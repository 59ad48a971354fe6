"""Engines: the same shards in this process and on Ray workers give the same rows.

Ray runs locally with 2 CPU workers; one Ray instance serves the whole module. The workers
load the tiny model from an HF checkpoint directory by path, as they would on a cluster.
Thread counts: the test process runs torch on 1 thread (conftest) and each Ray worker is
started with 1 thread (`EngineConfig.threads` 0 -> 1 per worker), so the float reductions
run in the same order on both sides and the log-probs and entropies match bit for bit.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from reasonmaxxer.backends.engines import EngineConfig, Progress, map_shards
from reasonmaxxer.backends.hf import SamplingConfig
from reasonmaxxer.data.problems import Problem
from reasonmaxxer.data.prompts import get_template
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages import sample as sample_module
from reasonmaxxer.stages.sample import SampleTask, sample_stage
from reasonmaxxer.stages.score import score_stage
from reasonmaxxer.store import RolloutStore

ray = pytest.importorskip("ray")

RAY2 = EngineConfig(engine="ray", workers=2)


@dataclass
class _DiesOnce(SampleTask):
    """A SampleTask whose worker process exits (a crash) when it starts shard `fault_shard`,
    once: the marker file records that it happened."""

    fault_shard: int = -1
    marker: str = ""

    def run(self, shard, chunk, progress):
        if shard == self.fault_shard and not Path(self.marker).exists():
            Path(self.marker).touch()
            os._exit(1)
        return super().run(shard, chunk, progress)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module


def _dies_once_on(monkeypatch, shard, marker):
    """sample_stage's shards run as `_DiesOnce` tasks dying on `shard`."""
    monkeypatch.setattr(sample_module, "SampleTask", lambda *a: _DiesOnce(*a, fault_shard=shard, marker=str(marker)))


PROBLEMS = [Problem(f"p/{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(6)]  # as read from p.jsonl
CFG = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, batch_size=4, seed=7)
TMPL = get_template("raw")


@pytest.fixture(scope="module")
def ray_local():
    from reasonmaxxer.backends.engines import init_ray, release_workers

    init_ray(RAY2)
    yield
    release_workers()
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return str(tiny_ckpt)


def _sample(out, ckpt, engine=None, **kw):
    return sample_stage(
        out, ckpt, PROBLEMS, TMPL, CFG, shard_size=2, grade_workers=0, progress=False, engine=engine, **kw
    )


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, ckpt):
    """The single-process reference store."""
    return _sample(tmp_path_factory.mktemp("ref") / "local", ckpt)


def _rows(store):
    return sorted(store.read_rows(), key=lambda r: (r["problem_id"], r["sample_index"]))


def test_local_map_runs_every_shard_in_process():
    class Double:
        def setup(self, model=None, tokenizer=None):
            self.k = 2

        def run(self, shard, payload, progress):
            progress.units(len(payload))
            return [x * self.k for x in payload]

    got = {}
    stats = map_shards(Double(), {0: [1, 2], 3: [5]}, None, got.__setitem__, total=3, desc="t", progress=False)
    assert got == {0: [2, 4], 3: [10]}
    assert (stats.engine, stats.workers, stats.shards, stats.retries) == ("local", 1, 2, 0)
    with pytest.raises(ReasonMaxxerError, match="engine must be one of"):
        EngineConfig(engine="spark")
    p = Progress()
    p.units(2), p.tokens(5)
    assert (p.n_units, p.n_tokens) == (2, 5)


def test_ray_rows_identical_to_local(tmp_path, ckpt, local_ref, ray_local):
    st = _sample(tmp_path / "ray", ckpt, RAY2)
    a, b = _rows(local_ref), _rows(st)
    assert len(a) == len(b) == len(PROBLEMS) * CFG.n
    assert a == b  # every column: token ids, text, log-probs, entropies, grades
    assert len({tuple(r["token_ids"]) for r in a}) > 1  # the samples are not all alike
    m, ref = st.manifest(), local_ref.manifest()
    assert (m["engine"], m["workers"], ref["engine"], ref["workers"]) == ("ray", 2, "local", 1)
    assert m["config_hash"] == ref["config_hash"] and m["complete"]
    assert m["engine_runs"][-1]["shards"] == 3 and m["engine_runs"][-1]["retries"] == 0


def test_worker_death_mid_shard_is_retried(tmp_path, ckpt, local_ref, ray_local, monkeypatch):
    marker = tmp_path / "died-once"
    _dies_once_on(monkeypatch, 1, marker)
    st = _sample(tmp_path / "ray", ckpt, RAY2)
    assert marker.exists(), "the worker should have died on shard 1"
    assert _rows(st) == _rows(local_ref)
    m = st.manifest()
    assert (m["engine"], m["workers"]) == ("ray", 2)
    assert m["engine_runs"][-1]["retries"] == 1 and sorted(m["shards"]) == ["00000", "00001", "00002"]


def test_retries_exhausted_is_one_line_error(tmp_path, ckpt, ray_local, monkeypatch):
    _dies_once_on(monkeypatch, 0, tmp_path / "marker")
    with pytest.raises(ReasonMaxxerError, match=r"ray: shard 0 lost its worker 1 times") as e:
        _sample(tmp_path / "ray", ckpt, EngineConfig(engine="ray", workers=2, max_retries=0))
    assert "\n" not in str(e.value)


def test_local_run_interrupted_then_finished_with_ray(tmp_path, ckpt, local_ref, ray_local, monkeypatch):
    from reasonmaxxer.models import load_model

    model, tok = load_model(ckpt)
    orig, n = RolloutStore.write_shard, {"k": 0}

    def write_then_die(self, i, rows):
        if n["k"] == 1:
            raise KeyboardInterrupt  # the local run is stopped after its first shard
        n["k"] += 1
        orig(self, i, rows)

    monkeypatch.setattr(RolloutStore, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _sample(tmp_path / "s", ckpt, model=model, tokenizer=tok)
    monkeypatch.setattr(RolloutStore, "write_shard", orig)
    st = RolloutStore(tmp_path / "s")
    assert st.done_shards() == {0} and not st.manifest()["complete"]
    mtime = st.shard_path(0).stat().st_mtime_ns
    st = _sample(tmp_path / "s", ckpt, RAY2)
    assert st.shard_path(0).stat().st_mtime_ns == mtime  # the local shard was kept, not redone
    assert _rows(st) == _rows(local_ref)
    m = st.manifest()
    assert (m["engine"], m["workers"], m["engine_runs"][-1]["shards"]) == ("ray", 2, 2)


def test_cli_sample_and_score_with_ray(tmp_path, ckpt, local_ref, ray_local):
    from reasonmaxxer.cli import main

    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in PROBLEMS))
    out = tmp_path / "cli"
    assert (
        main(
            [
                "sample",
                "--model",
                ckpt,
                "--problems",
                str(probs),
                "--template",
                "raw",
                "--n",
                "3",
                "--temperature",
                "1.0",
                "--max-new-tokens",
                "24",
                "--batch-size",
                "4",
                "--seed",
                "7",
                "--shard-size",
                "2",
                "--grade-workers",
                "0",
                "--out",
                str(out),
                "--engine",
                "ray",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    st = RolloutStore(out)
    assert [r["token_ids"] for r in _rows(st)] == [r["token_ids"] for r in _rows(local_ref)]
    # teacher-forced scores: ray == local, and equal to the sampler's own entropies (same model)
    assert main(["score", "--rollouts", str(out), "--out", str(tmp_path / "sc-ray"), "--engine", "ray"]) == 0
    local = score_stage(local_ref, tmp_path / "sc-local", ckpt, progress=False)
    a, b = _rows(local), _rows(RolloutStore(tmp_path / "sc-ray"))
    assert a == b and len(a) == len(PROBLEMS) * CFG.n
    assert RolloutStore(tmp_path / "sc-ray").manifest()["engine"] == "ray"
    for s, r in zip(_rows(local_ref), a):
        assert r["entropies"] == pytest.approx(s["entropies"], abs=1e-4)
        assert r["logprobs"] == pytest.approx(s["logprobs"], abs=1e-4)


def test_run_config_engine_keys(tmp_path):
    from reasonmaxxer.config import load_run_config

    p = tmp_path / "run.toml"
    p.write_text('engine = "ray"\nworkers = 3\nthreads = 2\n')
    eng = load_run_config(p, ray_address="auto").engine_config()
    assert (eng.engine, eng.workers, eng.worker_threads, eng.ray_address) == ("ray", 3, 2, "auto")
    assert eng.describe() == {"engine": "ray", "workers": 3}
    assert load_run_config(p, engine="local").engine_config().describe() == {"engine": "local", "workers": 1}


def test_eval_cli_and_pipeline_scoring_with_ray(tmp_path, ckpt, local_ref, ray_local):
    from reasonmaxxer.cli import main
    from reasonmaxxer.models import load_model
    from reasonmaxxer.stages.score import attach_scores, score_rows, score_rows_on

    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in PROBLEMS))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                ckpt,
                "--problems",
                str(probs),
                "--template",
                "raw",
                "--n",
                "2",
                "--max-new-tokens",
                "12",
                "--shard-size",
                "4",
                "--grade-workers",
                "0",
                "--out",
                str(out),
                "--engine",
                "ray",
            ]
        )
        == 0
    )
    assert (out / "eval.json").is_file()
    for d in ("samples", "greedy"):
        assert RolloutStore(out / d).manifest()["engine"] == "ray"
    # the run's scoring stage (attach_scores with rescore) on Ray: chunks of 8 rows, batches of 4 = one pass
    model, tok = load_model(ckpt)
    rows = _rows(local_ref)
    ref = score_rows(rows, model, tok, progress=False)
    assert [r["entropies"] for r in score_rows_on(rows, ckpt, RAY2, chunk=8, progress=False)] == ref
    got, info = attach_scores(
        local_ref,
        [dict(r) for r in rows],
        tmp_path / "scores.parquet",
        ckpt,
        model,
        tok,
        rescore=True,
        progress=False,
        engine=RAY2,
    )
    assert [r["base_entropies"] for r in got] == ref and not info["reused_sampler_entropies"]


def test_local_map_skips_a_shard_another_process_holds_then_finds_it_done(tmp_path):
    """Shard 1's lock is held elsewhere (a thread standing in for another process, which writes
    shard 1 and lets go): the map computes 0 and 2 first, then waits for 1, finds it written
    and does not compute it."""
    import threading

    from filelock import FileLock

    from reasonmaxxer.store import ShardClaims

    st = RolloutStore(tmp_path / "s")
    st.open({"a": 1})
    held, order = threading.Event(), []

    def other_process():
        with FileLock(st.shard_lock_path(1)):
            held.set()
            while len(order) < 2:  # until this process has done shards 0 and 2
                threading.Event().wait(0.01)
            st.write_shard(1, [])

    t = threading.Thread(target=other_process)
    t.start()
    held.wait(10)

    class Record:
        def setup(self, model=None, tokenizer=None):
            pass

        def run(self, shard, payload, progress):
            order.append(shard)
            return []

    stats = map_shards(
        Record(), {0: 0, 1: 1, 2: 2}, None, st.write_shard, total=3, desc="t", progress=False, claims=ShardClaims(st)
    )
    t.join(10)
    assert order == [0, 2] and stats.shards == 2 and st.done_shards() == {0, 1, 2}


def test_ray_queue_waits_for_a_busy_shard_only_when_holding_no_lock():
    from collections import deque

    from reasonmaxxer.backends.engines import _next_shard
    from reasonmaxxer.store import BUSY, DONE, MINE

    class Claims:
        def __init__(self):
            self.held, self.calls = set(), []

        def claim(self, i, wait=False):
            self.calls.append((i, wait))
            got = MINE if wait else {0: MINE, 1: BUSY, 2: DONE, 3: MINE}[i]
            if got == MINE:
                self.held.add(i)
            return got

    c = Claims()
    todo, pending, busy = deque(), deque([0, 1, 2, 3]), deque()
    assert _next_shard(todo, pending, busy, c) == 0
    assert _next_shard(todo, pending, busy, c) == 3  # 1 is busy, 2 is done
    assert list(busy) == [1] and _next_shard(todo, pending, busy, c) is None  # holds 0 and 3: no waiting
    c.held.clear()  # shards 0 and 3 written and released
    assert _next_shard(todo, pending, busy, c) == 1 and c.calls[-1] == (1, True)
    todo.append(5)  # a retry comes first, without a claim
    assert _next_shard(todo, pending, busy, c) == 5 and len(c.calls) == 5
