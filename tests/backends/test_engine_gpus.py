"""Ray workers and GPUs: how many each worker reserves (`worker_gpus`), that the reservation
reaches `ray.remote` (a fake Ray module records the options), that a worker without one
hides the GPUs, the flags, and, with real Ray and 2 logical GPUs, that each worker sees its
own GPU (Ray's CUDA_VISIBLE_DEVICES) when it loads its model."""

import os
import sys
from dataclasses import dataclass

import pytest

from reasonmaxxer.backends import engines
from reasonmaxxer.backends.engines import EngineConfig, map_shards, worker_gpus
from reasonmaxxer.errors import ReasonMaxxerError


@pytest.mark.parametrize(
    ("workers", "given", "cluster", "want"),
    [
        (2, None, 0, 0.0),  # no GPU: CPU workers
        (2, None, 2, 1.0),  # one GPU per worker
        (2, None, 8, 1.0),
        (2, None, 1, 0.5),  # two workers share the one GPU
        (4, None, 3, 0.5),  # ceil(4 / 3) = 2 per GPU, so all four fit (0.75 each would not)
        (3, None, 2, 0.5),
        (2, 0, 4, 0.0),  # explicit: CPU workers on a GPU cluster
        (2, 0.25, 1, 0.25),
        (1, 2, 2, 2.0),
    ],
)
def test_worker_gpus(workers, given, cluster, want):
    assert worker_gpus(EngineConfig(engine="ray", workers=workers, gpus_per_worker=given), cluster) == want


def test_worker_gpus_that_can_never_fit_is_an_error():
    with pytest.raises(ReasonMaxxerError, match=r"4 workers x 1 GPUs each need 4 GPUs, the cluster has 2"):
        worker_gpus(EngineConfig(engine="ray", workers=4, gpus_per_worker=1), 2)
    with pytest.raises(ReasonMaxxerError, match="gpus_per_worker must be in"):
        EngineConfig(engine="ray", gpus_per_worker=1.5)
    with pytest.raises(ReasonMaxxerError, match="gpus_per_worker must be in"):
        EngineConfig(engine="ray", gpus_per_worker=-1)


class _FakeRay:
    """The parts of `ray` that `engines._pool` uses; records `ray.remote` options and actor args."""

    def __init__(self, gpus: float):
        self.gpus, self.options, self.args = gpus, [], []

    def cluster_resources(self):
        return {"CPU": 8.0, "GPU": self.gpus} if self.gpus else {"CPU": 8.0}

    def get_runtime_context(self):
        return type("Ctx", (), {"get_node_id": lambda self: "node"})()

    def is_initialized(self):
        return True

    def kill(self, actor, no_restart=True):
        pass

    def remote(self, **options):
        self.options.append(options)
        fake = self

        class _Cls:
            def __init__(self, cls):
                pass

            def remote(self, *args):
                fake.args.append(args)
                return object()

        return _Cls


@pytest.mark.parametrize(("cluster", "given", "want"), [(2, None, 1.0), (1, None, 0.5), (0, None, 0.0), (4, 0.5, 0.5)])
def test_pool_passes_num_gpus_to_ray(monkeypatch, cluster, given, want):
    fake = _FakeRay(cluster)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(engines, "_POOL", {"key": None, "actors": []})
    actors = engines._pool(EngineConfig(engine="ray", workers=2, threads=3, gpus_per_worker=given))
    assert len(actors) == 2
    assert fake.options == [{"num_cpus": 3, "num_gpus": want, "max_restarts": 0}] * 2
    assert fake.args == [(3, want)] * 2  # the worker knows its share (0: it hides the GPUs)
    # the same share reuses the pool; a different one replaces the actors
    engines._pool(EngineConfig(engine="ray", workers=2, threads=3, gpus_per_worker=given))
    assert len(fake.options) == 2
    other = 0 if want else None  # None on a GPU-less cluster resolves to 0 again: use the fake's GPUs
    fake.gpus = fake.gpus or 2
    engines._pool(EngineConfig(engine="ray", workers=2, threads=3, gpus_per_worker=other))
    assert len(fake.options) == 4 and fake.options[-1]["num_gpus"] == (0 if want else 1.0)


def test_worker_without_gpus_hides_them(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    engines._Worker(1, 0.0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as Ray sets it for a worker given GPU 1
    engines._Worker(1, 1.0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_flags_reach_the_engine_config(tmp_path):
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.cli.options import engine_config
    from reasonmaxxer.config import load_run_config

    a = build_parser().parse_args(
        ["score", "--rollouts", "r", "--out", "o", "--engine", "ray", "--gpus-per-worker", "0.5"]
    )
    assert engine_config(a).gpus_per_worker == 0.5
    a = build_parser().parse_args(["score", "--rollouts", "r", "--out", "o"])
    assert engine_config(a).gpus_per_worker is None
    p = tmp_path / "c.toml"
    p.write_text('engine = "ray"\ngpus_per_worker = 0.25\n')
    assert load_run_config(p).engine_config().gpus_per_worker == 0.25
    assert load_run_config(p, gpus_per_worker=1).engine_config().gpus_per_worker == 1


@dataclass
class _WhereTask:
    """Reports, per shard, the GPUs the worker sees and the device its model was loaded on."""

    model_spec: str

    def setup(self, model=None, tokenizer=None):
        self.device = str(next(model.parameters()).device)

    def run(self, shard, payload, progress):
        import ray

        return os.environ.get("CUDA_VISIBLE_DEVICES"), [str(g) for g in ray.get_gpu_ids()], self.device


@pytest.mark.slow
def test_real_ray_gives_each_worker_its_own_gpu(tiny_ckpt):
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    path = os.pathsep.join(p for p in (engines._package_root(), os.environ.get("PYTHONPATH")) if p)
    # 2 logical GPUs (no real one here): Ray assigns them and sets CUDA_VISIBLE_DEVICES as on a GPU node
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        got = {}
        map_shards(
            _WhereTask(str(tiny_ckpt)),
            {0: None, 1: None},
            EngineConfig(engine="ray", workers=2),
            got.__setitem__,
            total=2,
            desc="t",
            progress=False,
        )
    finally:
        engines.release_workers()
        ray.shutdown()
    visible = sorted(v for v, _, _ in got.values())
    assert visible == ["0", "1"], got  # one GPU each, not both on GPU 0
    assert sorted(g for _, (g,), _ in got.values()) == ["0", "1"]
    assert {d for _, _, d in got.values()} == {"cpu"}  # no real GPU here: torch finds none
