"""Experiment trackers for training: ``--report-to tensorboard | wandb | none``.

`make_tracker(kind, out_dir, config, run_name)` returns an object with ``log(metrics, step)``
and ``close()``. `train` hands it each optimizer step's metrics: exactly the dict written to
``metrics.jsonl`` (loss terms, gated fraction, grad norm, lr, tokens/s, validation accuracy
when evaluated). Only the main process logs (the caller makes the tracker there, and `train`
logs where it writes metrics.jsonl). A tracker is not part of TrainConfig: it changes no
number and not the config a resumed run is compared against.

The tracker's package is imported when it is made, so a missing one is a one-line error
before any model is loaded or step is taken.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ReasonMaxxerError
from ..io import json_ready

REPORT_TO = ("none", "tensorboard", "wandb")
_PIP = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def _scalars(metrics: dict) -> dict:
    """The numeric entries of a metrics record (bools and strings dropped; "step" is the x axis)."""
    return {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class NoTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars under ``out_dir/tb`` (``tensorboard --logdir out_dir/tb``)."""

    def __init__(self, out_dir: Path, config: dict, run_name: str):
        from torch.utils.tensorboard import SummaryWriter  # make_tracker checked that it imports

        # torch/utils/tensorboard/writer.py: SummaryWriter(log_dir=None, comment="", purge_step=None, ...)
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
        self.writer.add_text("run", f"{run_name}: {config}", 0)

    def log(self, metrics: dict, step: int) -> None:
        # add_scalar(tag, scalar_value, global_step=None, walltime=None, ...) (writer.py)
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(f"train/{k}", v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A W&B run (project: $WANDB_PROJECT, else "reasonmaxxer"), its files under out_dir."""

    def __init__(self, out_dir: Path, config: dict, run_name: str):
        import wandb  # make_tracker checked that it imports

        # wandb.init(entity=None, project=None, dir=None, id=None, name=None, ..., config=None, ...) -> Run;
        # run.log(data, step=...), run.finish() (docs.wandb.ai/ref/python/init)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "reasonmaxxer",
            name=run_name,
            config=config,
            dir=str(out_dir),
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def check_tracker(kind: str) -> None:
    """The one-line error for an unknown tracker or a missing package, before anything runs."""
    if kind not in REPORT_TO:
        raise ReasonMaxxerError(f"--report-to: unknown tracker {kind!r}; choose one of {', '.join(REPORT_TO)}")
    if kind == "none":
        return
    try:
        if kind == "tensorboard":
            # torch/utils/tensorboard/__init__.py imports the `tensorboard` package (ImportError without it)
            import torch.utils.tensorboard  # noqa: F401
        else:
            import wandb  # noqa: F401
    except ImportError as e:
        raise ReasonMaxxerError(f"--report-to {kind}: the {kind} package is not installed ({_PIP[kind]})") from e


def make_tracker(kind: str, out_dir: str | Path, config: dict, run_name: str):
    """The tracker for ``--report-to kind`` ("none": one that does nothing); `config` is
    recorded with the run (made JSON-safe). Its close() may be called more than once."""
    check_tracker(kind)
    if kind == "none":
        return NoTracker()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cls = TensorBoardTracker if kind == "tensorboard" else WandbTracker
    return cls(out, json_ready(config), run_name)
