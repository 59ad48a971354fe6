"""recipes.calibrate: `reasonmaxxer calibrate` (select + score a rollout store, then `tau_sweep.sweep_tau`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..stages.select import SelectionConfig
from ..stages.train import TrainConfig, examples_from_selection
from ..store import RolloutStore
from .run import prepare_training_data
from .tau_sweep import require_validation, sweep_tau


def calibrate(
    store: RolloutStore,
    model_spec: str,
    model,
    tokenizer,
    validate,
    *,
    taus: Sequence[float],
    selection: SelectionConfig,
    train_cfg: TrainConfig,
    out: Path,
    max_steps: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Sweep tau (nats) with short trainings; pick the best validation accuracy.

    Each candidate trains `max_steps` optimizer steps from the same data and is scored by
    `validate(model)` on its validation problems; tau=None rows are never produced (the gate must be non-empty).
    Writes out/calibrate.json and out/calibrate.md; returns the dict.
    """
    out = Path(out)
    require_validation(validate)  # before the store is scored
    sel, srows, _ = prepare_training_data(
        store, model_spec, model, tokenizer, selection, train_cfg, out / "scores.parquet", progress=progress
    )
    examples = examples_from_selection(srows, selection.truncated)
    return sweep_tau(
        examples,
        model_spec,
        model,
        tokenizer,
        validate,
        taus=taus,
        train_cfg=train_cfg,
        out=out,
        max_steps=max_steps,
        progress=progress,
        overwrite=overwrite,
    )
