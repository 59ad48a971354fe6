"""config: the run config, and one typed loader for every config dataclass.

The stage configs (`SamplingConfig`, `SelectionConfig`, `TrainConfig`, `EvalConfig`,
`VLLMOptions`) are frozen dataclasses defined next to their stages; each field carries its
help text and checks as field metadata: ``help``, ``choices`` (a tuple, or a callable that
returns one, e.g. the loss registry), and bounds ``ge``/``gt``/``le``/``lt``.
`build_config` turns a TOML table into one of them, checking unknown keys, types (from the
annotations) and the metadata checks, with errors like
``demo.toml [train] lr: expected a float, got "fast"``. `add_config_flags` /
`config_overrides` generate the `run`/`demo` command-line flags from the same fields.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

from .backends.hf import SamplingConfig
from .backends.vllm import VLLMOptions
from .errors import ReasonMaxxerError
from .io import read_toml
from .schema import check_fields, check_value_meta, choices_of, show_value
from .stages.evaluate import EvalConfig
from .stages.select import SelectionConfig
from .stages.tracking import REPORT_TO
from .stages.train import TrainConfig


# -- the run config ------------------------------------------------------------------------
# The defaults are the reference run's (configs/arith.toml sets the same values explicitly;
# the demo, configs/demo.toml, is a smaller version of it).
@dataclass(frozen=True)
class CalibrateConfig:
    """``[calibrate]``: choose tau on the validation split before training (`recipes.tau_sweep`)."""

    taus: tuple[float, ...] = field(
        default=(), metadata={"help": "candidate taus, nats; empty (default): tau from [train]"}
    )
    max_steps: int = field(default=8, metadata={"help": "optimizer steps of each candidate's training", "ge": 1})

    def __post_init__(self):
        check_fields(self, "calibrate")


@dataclass(frozen=True)
class RunConfig:
    """A whole run, as read from a TOML file (see configs/demo.toml); flags override it."""

    model: str = field(default="smollm2-135m", metadata={"help": "model alias, .gguf, HF dir or Hub id"})
    template: str = field(
        default="fewshot", metadata={"help": "prompt template: raw, chat, fewshot, mistral, a .txt file or a string"}
    )
    out: str = field(default="runs/run", metadata={"help": "run directory"})
    train_problems: str = field(default="arith:train:80", metadata={"help": "problems to sample and train on"})
    validation_problems: str = field(
        default="arith:validation:32", metadata={"help": "held-out problems for checkpoint selection ('' = none)"}
    )
    validation_temperature: float = field(
        default=0.0,
        metadata={
            "help": "the one validation completion per problem that picks the checkpoint (and scores "
            "the [calibrate] taus): 0 = greedy, "
            "> 0 = sampled at this temperature with [eval] top_p and seed (the official recipe: 0.6)",
            "ge": 0,
        },
    )
    test_problems: str = field(default="arith:test:96", metadata={"help": "held-out test problems"})
    data_dir: str | None = field(default=None, metadata={"help": "local benchmark data dir"})
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=4, temperature=0.7, max_new_tokens=96, batch_size=32, seed=42)
    )
    selection: SelectionConfig = field(
        default_factory=lambda: SelectionConfig(max_problems=64, truncated="drop", order="clarity")
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            tau_fraction=0.05,
            lam=0.2,
            lora_rank=32,
            lora_alpha=64,
            lr=2e-4,
            micro_batch=8,
            grad_accum=1,
            warmup_steps=4,
            epochs=2.0,
            checkpoint_every=13,
        )
    )
    eval: EvalConfig = field(
        default_factory=lambda: EvalConfig(n=4, temperature=0.7, greedy=True, max_new_tokens=96, batch_size=32)
    )
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    rescore: bool = field(default=False, metadata={"help": "re-score base entropies even if the sampler's fit"})
    threads: int = field(
        default=0, metadata={"help": "torch threads (0 = torch's default); per Ray worker: this or 1", "ge": 0}
    )
    engine: str = field(
        default="local",
        metadata={"help": "where sample, score and eval run: local | ray (same results)", "choices": ("local", "ray")},
    )
    workers: int = field(default=2, metadata={"help": "Ray workers (each loads the model once)", "ge": 1})
    ray_address: str | None = field(
        default=None, metadata={"help": "a running Ray cluster ('auto' or host:port); default: a local Ray instance"}
    )
    gpus_per_worker: float | None = field(
        default=None,
        metadata={
            "help": "GPUs each Ray worker reserves (a fraction shares a GPU; 0: CPU workers; "
            "default: 1 per worker when there are enough, else an equal share, 0 without GPUs)",
            "ge": 0,
        },
    )
    reuse: str | None = field(
        default=None, metadata={"help": "a run dir whose base rollouts and base eval to reuse when inputs match"}
    )
    backend: str = field(
        default="hf",
        metadata={
            "help": "sampling + eval backend: hf | vllm (training and scoring are HF)",
            "choices": ("hf", "vllm"),
        },
    )
    vllm: VLLMOptions = field(default_factory=VLLMOptions)  # [vllm] engine options (backend = "vllm")
    report_to: str = field(
        default="none",
        metadata={
            "help": "log each training step's metrics to: none | tensorboard (out/train/tb) | wandb",
            "choices": REPORT_TO,
        },
    )
    push_to_hub: str = field(
        default="",
        metadata={"help": "after the run, upload the adapter (with its model card) to this Hub repo ('' = no)"},
    )

    def engine_config(self):
        from .backends.engines import EngineConfig

        return EngineConfig(
            engine=self.engine,
            workers=self.workers,
            threads=self.threads,
            ray_address=self.ray_address,
            gpus_per_worker=self.gpus_per_worker,
        )


# -- typed building --------------------------------------------------------------------------
_TYPE_NAMES = {int: "an integer", float: "a float", bool: "a boolean (true/false)", str: "a string"}


def _check_value(tp, v, where: str):
    """`v` checked against the annotation `tp` (lists become tuples); a one-line error otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_value(inner[0], v, where)
    elif origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ReasonMaxxerError(f"{where}: expected a list, got {show_value(v)}")
        item = args[0] if args else typing.Any
        return tuple(_check_value(item, x, f"{where}[{i}]") for i, x in enumerate(v))
    elif is_dataclass(tp):
        if isinstance(v, tp):
            return v
        if not isinstance(v, dict):
            raise ReasonMaxxerError(f"{where}: expected a table, got {show_value(v)}")
        return build_config(tp, v, where)
    elif tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v  # an int is a fine float (kept as written: same hashes as before)
    elif tp is str:
        if isinstance(v, str):
            return v
    else:
        return v  # an annotation this checker does not know: accept as is
    raise ReasonMaxxerError(
        f"{where}: expected {_TYPE_NAMES.get(tp, getattr(tp, '__name__', str(tp)))}, got {show_value(v)}"
    )


def build_config(cls, d: dict, where: str, base=None):
    """`cls` (a config dataclass) from the table `d`, over `base` (an instance; default: the
    class defaults). Unknown keys, wrong types, out-of-range values and invalid choices are a
    `ReasonMaxxerError` naming `where` (e.g. ``demo.toml [train]``) and the key."""
    flds = {f.name: f for f in fields(cls)}
    bad = sorted(set(d) - set(flds))
    if bad:
        raise ReasonMaxxerError(f"{where}: unknown key(s) {bad}; valid: {sorted(flds)}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        sub_base = getattr(base, k) if base is not None else None
        table = _scalar(hints[k])  # a table may be optional (BaselineConfig.eval)
        if is_dataclass(table) and isinstance(v, dict):
            kw[k] = build_config(table, v, f"{where} [{k}]", base=sub_base)
            continue
        kw[k] = _check_value(hints[k], v, f"{where} {k}")
        check_value_meta(flds[k].metadata, kw[k], f"{where} {k}")
    if base is not None:
        kw = {f.name: kw.get(f.name, getattr(base, f.name)) for f in fields(cls)}
    return cls(**kw)


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
    """Read a TOML run config (tables [sampling], [selection], [train], [eval], [vllm]) over the
    `RunConfig` defaults; `overrides` (``"train.lr"``-style keys; None = not given) win.
    Everything is type- and range-checked here, before any model is loaded."""
    raw = _with_extends(read_toml(path), path)
    where = str(path or "config")
    for k, v in overrides.items():
        if v is None:
            continue
        sec, _, key = k.partition(".")
        if key:
            if not isinstance(raw.setdefault(sec, {}), dict):
                raise ReasonMaxxerError(f"{where}: [{sec}] must be a table")
            raw[sec][key] = v
        else:
            raw[k] = v
    return build_config(RunConfig, raw, where, base=RunConfig())


# -- command-line flags from the same fields -------------------------------------------------
# flags that existed before they were generated, kept as aliases
_ALIASES = {
    "vllm.tensor_parallel_size": "--tensor-parallel-size",
    "vllm.data_parallel_size": "--data-parallel-size",
    "vllm.gpu_memory_utilization": "--gpu-memory-utilization",
    "sampling.stop": "--stop",  # the name `sample` and `eval` use
}


def _flag_fields(cls=RunConfig, prefix: str = ""):
    """(dotted key, field, annotation) for every scalar/tuple field, nested tables flattened."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from _flag_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _scalar(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _scalar(args[0])
    return tp


def add_config_flags(p: argparse.ArgumentParser, cls=RunConfig, only=None, title=None) -> None:
    """One flag per field of `cls` (nested tables as ``--train-lr``; `only`: these top-level
    names), with the field's help text and choices. Every default is None (= not given), so
    flags > config file > defaults."""
    g = p.add_argument_group(title or "config overrides (flags > config file > defaults)")
    for key, f, tp in _flag_fields(cls):
        if only is not None and key not in only:
            continue
        names = ["--" + key.replace(".", "-").replace("_", "-")]
        if key in _ALIASES:
            names.append(_ALIASES[key])
        hlp = f.metadata.get("help", "")
        if cls is RunConfig:
            dflt = f"the config's, else {_get(RunConfig(), key)!r}"
        else:
            dflt = repr(f.default if f.default is not MISSING else None)
        hlp = f"{hlp} (default: {dflt})".strip().replace("%", "%%")
        st = _scalar(tp)
        kw = dict(dest=key.replace(".", "_"), default=None, help=hlp)
        if st is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(st) is tuple:
            item = (typing.get_args(st) or (str,))[0]
            meta = {int: "N", float: "X"}.get(item, "S")
            g.add_argument(*names, nargs="+", type=item if item in (int, float) else str, metavar=meta, **kw)
        else:
            c = choices_of(f.metadata)
            meta = None if c else {int: "N", float: "X"}.get(st, "S")
            g.add_argument(*names, type=st if st in (int, float) else str, choices=c, metavar=meta, **kw)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def config_overrides(a: argparse.Namespace, cls=RunConfig) -> dict:
    """The flags given (not None) as ``load_run_config`` overrides (``{"train.lr": 3e-4}``)."""
    out = {}
    for key, _, _ in _flag_fields(cls):
        v = getattr(a, key.replace(".", "_"), None)
        if v is not None:
            out[key] = v
    return out
