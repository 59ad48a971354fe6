"""Where shards run: in this process ("local") or on Ray actors ("ray").

The embarrassingly parallel stages (sample, score, eval) are a map over shards: a shard's
result depends only on its own inputs (per-(seed, problem, sample) seeding,
`sampling.request_seed`), so it does not matter which worker computes it. `map_shards` runs
a `ShardTask` over shard payloads and hands each result to `on_result` on the driver:

- ``local``: one in-process worker; the task is set up once (or reuses a loaded model) and
  the shards run in order. This is the single-process behaviour.
- ``ray``: `workers` actors, each sets its torch thread count (`threads`, default 1), loads
  the model once (from the task's picklable `model_spec`) and computes one shard at a time.
  Each actor asks Ray for `gpus_per_worker` GPUs (`worker_gpus`: unset = one GPU per worker
  when the cluster has that many, an equal share of the GPUs when it has fewer, 0 without
  GPUs). Ray sets CUDA_VISIBLE_DEVICES in an actor to the GPUs it was given, so the actor's
  "cuda" (`models.default_device`) is its own GPU: one model per GPU. An actor given no GPU
  hides the GPUs and runs on the CPU.
  The actors stay up between maps in the same process (the next map on the same model
  reuses the loaded model; `release_workers()` frees them). The rows come back to the
  driver, which grades them, writes the store shard atomically and updates the manifest
  (`on_result`). Workers never touch the store, so a cluster needs no shared filesystem; it
  needs the model spec to resolve on every node (a Hub id, the embedded alias, or a path
  that exists everywhere) and the same reasonmaxxer installed. The driver's
  ``REASONMAXXER_*`` and ``HF_HUB_OFFLINE`` variables are set in the workers.

Failures: when a worker process dies mid-shard (`RayActorError`, `WorkerCrashedError`: a
crash, an OOM kill, a lost node), only that shard is lost; the actor is killed and replaced
and the shard resubmitted, up to `max_retries` times per shard, after which the run stops
with a one-line error (finished shards stay on disk; re-running resumes). An exception
raised by the task itself (bad input) is not retried: it would fail again.

Identity: a shard is computed by the same code on the same inputs in both engines, so the
rows are identical when the torch thread count is the same (a different thread count can
split a matrix product's reductions differently and round differently). Which engine and how many workers ran are recorded in the store manifest,
outside its config hash: a local run and a ray run of the same inputs are the same artifact
(either can resume the other).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import ReasonMaxxerError, first_line
from ..store import BUSY, MINE, ShardClaims

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """engine "local" | "ray"; workers: Ray actors; threads: torch threads per worker
    (0 = torch's default in local mode, 1 on Ray); ray_address: None = start a local Ray
    instance, "auto" or "host:port" = join a running cluster; max_retries: per shard;
    gpus_per_worker: GPUs each Ray worker requests (fractions share a GPU; None = `worker_gpus`'s
    choice; 0 = CPU workers)."""

    engine: str = "local"
    workers: int = 2
    threads: int = 0
    ray_address: str | None = None
    max_retries: int = 2
    gpus_per_worker: float | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ReasonMaxxerError(f"engine must be one of {', '.join(ENGINES)} (got {self.engine!r})")
        if self.workers < 1 or self.threads < 0 or self.max_retries < 0:
            raise ReasonMaxxerError("engine: workers must be >= 1, threads and max_retries >= 0")
        g = self.gpus_per_worker
        if g is not None and (g < 0 or (g > 1 and not float(g).is_integer())):
            # Ray places a fractional request on one GPU; above 1 it takes whole GPUs only
            raise ReasonMaxxerError(f"engine: gpus_per_worker must be in [0, 1] or a whole number (got {g})")

    @property
    def worker_threads(self) -> int:
        return self.threads or 1

    def describe(self) -> dict:
        """What goes into a manifest (never into a config hash)."""
        return {"engine": self.engine, "workers": self.workers if self.engine == "ray" else 1}


LOCAL = EngineConfig()


class Progress:
    """Counts finished units (sequences, rows) and generated tokens; forwards to callbacks."""

    def __init__(self, on_units: Callable[[int], None] | None = None, on_tokens: Callable[[int], None] | None = None):
        self.n_units = self.n_tokens = 0
        self._on_units, self._on_tokens = on_units, on_tokens

    def units(self, k: int = 1) -> None:
        self.n_units += k
        if self._on_units:
            self._on_units(k)

    def tokens(self, k: int) -> None:
        self.n_tokens += k
        if self._on_tokens:
            self._on_tokens(k)


class ShardTask(Protocol):
    """A picklable description of per-shard work (a model spec, configs; no loaded model)."""

    model_spec: str

    def setup(self, model=None, tokenizer=None) -> None:
        """Adopt the given model (None: load `model_spec`). Called once per worker and map."""

    def run(self, shard: int, payload: Any, progress: Progress) -> Any:
        """Compute one shard's result (e.g. rows) from its payload."""


@dataclass
class MapStats:
    engine: str
    workers: int
    shards: int = 0
    retries: int = 0
    tokens: int = 0
    seconds: float = 0.0


def map_shards(
    task: ShardTask,
    payloads: Mapping[int, Any],
    engine: EngineConfig | None,
    on_result: Callable[[int, Any], None],
    *,
    total: int,
    desc: str,
    unit: str = "seq",
    progress: bool = True,
    model=None,
    tokenizer=None,
    claims: ShardClaims | None = None,
) -> MapStats:
    """Run `task` over `payloads` ({shard index: payload}) and call `on_result(shard, result)`
    on the driver for each, in completion order. `total` sizes the progress bar (units).
    `model`/`tokenizer` are reused by the local engine (Ray workers load their own).
    `claims` (a store's `ShardClaims`): a shard is computed only while this process holds its
    lock; shards another process holds are done last (after waiting for their lock) and
    skipped if that process wrote them, so processes sharing a store split its shards."""
    from tqdm.auto import tqdm

    engine = engine or LOCAL
    stats = MapStats(**engine.describe())
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    t0 = time.time()

    def on_tokens(k):
        stats.tokens += k
        el = time.time() - t0
        if el > 0:
            bar.set_postfix_str(f"{stats.tokens / el:.0f} tok/s", refresh=False)

    try:
        if engine.engine == "local":
            if engine.threads:
                import torch

                torch.set_num_threads(engine.threads)
            task.setup(model, tokenizer)
            prog = Progress(bar.update, on_tokens)
            for i in _claimed(payloads, claims):
                on_result(i, task.run(i, payloads[i], prog))
                stats.shards += 1
                if claims is not None:
                    claims.release(i)
        else:
            _map_ray(task, payloads, engine, on_result, stats, bar, on_tokens, claims)
    finally:
        bar.close()
        if claims is not None:
            claims.release_all()
    stats.seconds = round(time.time() - t0, 2)
    return stats


def _claimed(payloads: Mapping[int, Any], claims: ShardClaims | None) -> Iterator[int]:
    """The shards to compute, in order, each claimed (locked) when yielded: first those no
    other process holds, then those it held, waiting for each, unless it wrote them."""
    if claims is None:
        yield from payloads
        return
    busy = []
    for i in payloads:
        got = claims.claim(i)
        if got == BUSY:
            busy.append(i)
        elif got == MINE:
            yield i
    for i in busy:
        if claims.claim(i, wait=True) == MINE:
            yield i


# -- Ray --------------------------------------------------------------------------------
def _package_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def init_ray(engine: EngineConfig) -> None:
    """Connect to `engine.ray_address`, or start a quiet local instance with workers x threads
    CPUs (no dashboard, worker logs not forwarded). A no-op if Ray is already initialised."""
    try:
        import ray
    except ImportError:
        raise ReasonMaxxerError(
            "--engine ray needs Ray: run `pip install 'reasonmaxxer[ray]'` (or `pip install ray`)"
        ) from None
    if ray.is_initialized():
        return
    kw: dict = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    if engine.ray_address:
        kw["address"] = engine.ray_address
    else:
        # local workers import this very reasonmaxxer (a checkout may shadow an installed copy)
        path = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)
        kw.update(num_cpus=engine.workers * engine.worker_threads, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise ReasonMaxxerError(
            f"ray: cannot connect to {engine.ray_address!r} ({e}); start the cluster with "
            "`ray start --head` or drop --ray-address for a local instance"
        ) from None


class _Worker:
    """The body of a Ray actor: computes one shard at a time for whatever task it is sent,
    keeping the last model it loaded, so consecutive maps over the same model (eval's sampled
    and greedy passes) load it once per worker."""

    def __init__(self, threads: int, gpus: float = 0.0):
        if not gpus:  # a worker without a GPU reservation must not load onto one (GPU 0) anyway
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch

        torch.set_num_threads(threads)
        self.task_key = self.model_spec = self.model = self.tokenizer = None

    def run(self, key: str, task: ShardTask, shard: int, payload, env: dict):
        for k in [k for k in os.environ if _forwarded(k) and k not in env]:
            del os.environ[k]
        os.environ.update(env)
        if key != self.task_key:
            if task.model_spec != self.model_spec:
                from ..models import load_model

                self.model = self.tokenizer = None  # free the old model first
                self.model, self.tokenizer = load_model(task.model_spec)
                self.model_spec = task.model_spec
            task.setup(self.model, self.tokenizer)
            self.task, self.task_key = task, key
        prog = Progress()
        result = self.task.run(shard, payload, prog)
        return result, prog.n_units, prog.n_tokens


def _forwarded(name: str) -> bool:
    return name.startswith("REASONMAXXER_") or name == "HF_HUB_OFFLINE"


_POOL: dict = {"key": None, "actors": []}


def _pool(engine: EngineConfig) -> list:
    """The live actors (created on first use, kept between maps in this Ray session)."""
    import ray

    gpus = worker_gpus(engine, ray.cluster_resources().get("GPU", 0))
    key = (ray.get_runtime_context().get_node_id(), engine.worker_threads, gpus)
    if _POOL["key"] != key:
        release_workers()
        _POOL["key"] = key
    actors = _POOL["actors"]
    while len(actors) < engine.workers:
        actors.append(_new_actor(engine, gpus))
    return actors


def worker_gpus(engine: EngineConfig, cluster_gpus: float) -> float:
    """GPUs each Ray worker asks for: `engine.gpus_per_worker` if set; else, on a cluster with
    `cluster_gpus` GPUs, 1 when there is one per worker, 1/k when k workers must share each GPU
    (k = ceil(workers / GPUs), so that all fit), 0 without GPUs. Raises when the request can
    never be met (Ray would leave the workers pending forever)."""
    g, n = engine.gpus_per_worker, int(cluster_gpus)
    if g is None:
        return 0.0 if n < 1 else 1.0 if n >= engine.workers else 1.0 / math.ceil(engine.workers / n)
    if g * engine.workers > cluster_gpus + 1e-9:
        raise ReasonMaxxerError(
            f"ray: {engine.workers} workers x {g:g} GPUs each need {g * engine.workers:g} GPUs, the cluster has "
            f"{cluster_gpus:g}: lower --workers or --gpus-per-worker (0 = CPU workers)"
        )
    return float(g)


def _new_actor(engine: EngineConfig, gpus: float):
    import ray

    # num_gpus: Ray reserves the GPUs and sets CUDA_VISIBLE_DEVICES in the actor to them
    # (ray/_private/utils.py set_visible_accelerator_ids); with 0 it leaves the variable alone
    opts = dict(num_cpus=engine.worker_threads, num_gpus=gpus, max_restarts=0)
    return ray.remote(**opts)(_Worker).remote(engine.worker_threads, gpus)


def release_workers() -> None:
    """Kill the pooled Ray workers (and free their models), e.g. before training on this machine."""
    if _POOL["actors"]:
        import ray

        if ray.is_initialized():
            for a in _POOL["actors"]:
                ray.kill(a, no_restart=True)
    _POOL.update(key=None, actors=[])


def _next_shard(todo: deque, pending: deque, busy: deque, claims: ShardClaims | None) -> int | None:
    """The next shard for a Ray worker, claimed: a retry, else a pending shard (one another
    process holds goes to `busy`), else, once this process holds no lock (the other process
    may be waiting for one of ours), a busy one after waiting for its lock. None: none now."""
    while True:
        if todo:
            return todo.popleft()
        if pending:
            i = pending.popleft()
            got = claims.claim(i) if claims is not None else MINE
            if got == BUSY:
                busy.append(i)
            elif got == MINE:
                return i
        elif busy and not claims.held:
            i = busy.popleft()
            if claims.claim(i, wait=True) == MINE:
                return i
        else:
            return None


def _map_ray(task, payloads, engine, on_result, stats, bar, on_tokens, claims=None) -> None:
    import uuid

    import ray
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    init_ray(engine)
    actors = _pool(engine)
    key, task_ref = uuid.uuid4().hex, ray.put(task)
    env = {k: v for k, v in os.environ.items() if _forwarded(k)}
    todo: deque = deque()  # claimed shards to resubmit
    pending, busy = deque(payloads), deque()
    attempts = {i: 0 for i in payloads}
    idle = list(range(min(engine.workers, len(payloads))))[::-1]
    inflight: dict = {}

    def fill():
        while idle and (i := _next_shard(todo, pending, busy, claims)) is not None:
            slot = idle.pop()
            inflight[actors[slot].run.remote(key, task_ref, i, payloads[i], env)] = (slot, i)

    try:
        while True:
            fill()
            if not inflight:
                break
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, i = inflight.pop(ref)
            try:
                result, n_units, n_tokens = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                attempts[i] += 1
                reason = first_line(e)
                if attempts[i] > engine.max_retries:
                    raise ReasonMaxxerError(
                        f"ray: shard {i} lost its worker {attempts[i]} times (last: {reason}); "
                        "finished shards are kept, re-run to resume"
                    ) from None
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = _new_actor(engine, _POOL["key"][2])  # the pool's GPUs per worker
                idle.append(slot)
                todo.appendleft(i)
                stats.retries += 1
                bar.write(
                    f"ray: worker died on shard {i} ({reason}); retrying on a new worker "
                    f"({attempts[i]}/{engine.max_retries})"
                )
                continue
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, ReasonMaxxerError):
                    raise cause from None
                raise
            idle.append(slot)
            fill()  # keep the worker busy while the driver grades and writes
            on_result(i, result)
            stats.shards += 1
            if claims is not None:
                claims.release(i)
            bar.update(n_units)
            on_tokens(n_tokens)
    except BaseException:
        release_workers()  # shards still running would hold up the next map
        raise
