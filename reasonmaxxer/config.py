"""config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from .backends.hf import SamplingConfig
from .backends.vllm import VLLMOptions
from .errors import ReasonMaxxerError
from .io import read_toml
from .stages.evaluate import EvalConfig
from .stages.train import TrainConfig


# -- the run config ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """A whole run, as read from a TOML file (see configs/demo.toml); flags override it."""

    model: str = "smollm2-135m"
    template: str = "fewshot"
    out: str = "runs/run"
    train_problems: str = "arith:train:64"
    validation_problems: str = "arith:validation:24"
    test_problems: str = "arith:test:64"
    data_dir: str | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8, max_new_tokens=256))
    selection: dict = field(default_factory=dict)  # selection.SelectionConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rescore: bool = False
    threads: int = 0  # torch threads (0 = torch's default); per Ray worker: this or 1
    engine: str = "local"  # where sample, score and eval run: "local" | "ray" (see engines.py)
    workers: int = 2  # Ray workers
    ray_address: str | None = None  # None: a local Ray instance; "auto"/host:port: a running cluster
    reuse: str | None = None  # a run dir whose base rollouts and base eval to reuse when their inputs match
    backend: str = "hf"  # sampling + eval backend: hf | vllm (training and scoring are HF)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)  # [vllm] engine options (backend = "vllm")

    def engine_config(self):
        from .backends.engines import EngineConfig

        return EngineConfig(
            engine=self.engine, workers=self.workers, threads=self.threads, ray_address=self.ray_address
        )


def _build(cls, d: dict, where: str):
    names = {f.name for f in fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise ReasonMaxxerError(f"{where}: unknown key(s) {bad}; valid: {sorted(names)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def _with_extends(raw: dict, path, depth: int = 0) -> dict:
    """Resolve ``extends = "other.toml"`` (relative to the file): the other file's keys, then
    this file's on top (tables merged key by key)."""
    parent = raw.pop("extends", None)
    if not parent:
        return raw
    if depth > 8:
        raise ReasonMaxxerError(f"{path}: 'extends' nests too deep (a cycle?)")
    ppath = Path(path).parent / parent
    base = _with_extends(read_toml(ppath), ppath, depth + 1)
    for k, v in raw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def load_run_config(path: str | Path | None = None, **overrides) -> RunConfig:
    """Read a TOML run config (sections [sampling], [selection], [train], [eval]); flags win."""
    raw = _with_extends(read_toml(path), path)
    where = str(path or "config")
    for k, v in overrides.items():
        if v is None:
            continue
        sec, _, key = k.partition(".")
        if key:
            raw.setdefault(sec, {})[key] = v
        else:
            raw[k] = v
    sub = {"sampling": SamplingConfig, "train": TrainConfig, "eval": EvalConfig, "vllm": VLLMOptions}
    top = {}
    for k, v in raw.items():
        if k in sub:
            if not isinstance(v, dict):
                raise ReasonMaxxerError(f"{where}: [{k}] must be a table")
            top[k] = _build(sub[k], v, f"{where} [{k}]")
        elif k == "selection":
            from .stages.select import SelectionConfig

            _build(SelectionConfig, v, f"{where} [selection]")  # validate early
            top[k] = dict(v)
        else:
            top[k] = v
    return _build(RunConfig, top, where)
