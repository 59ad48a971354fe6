"""recipes.tau_sweep: short trainings at candidate taus, scored on the validation problems.

Used by `reasonmaxxer calibrate` (`recipes.calibrate`) and by `run` with a ``[calibrate]``
table (`recipes.run`): the validation split only; the test split is never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, atomic_write_json
from ..stages.train import TrainConfig, TrainExample


def sweep_tau(
    examples: Sequence[TrainExample],
    model_spec: str,
    model,
    tokenizer,
    validate: Callable | None,
    *,
    taus: Sequence[float],
    train_cfg: TrainConfig,
    out: Path,
    max_steps: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Sweep tau (nats) with short trainings; pick the best validation accuracy.

    Each candidate trains `max_steps` optimizer steps from the same examples (in out/tau-X,
    resumable) and is scored by `validate(model) -> accuracy` on its validation problems
    (their count: `validation_size`) (`stages.evaluate.validation_accuracy_fn`: the one that picks a run's checkpoint,
    greedy or sampled); ties go to the gated fraction nearest 5%. `overwrite`: retrain a
    candidate's dir made with another config or validation (else refused).
    Writes out/calibrate.json and out/calibrate.md; returns the dict (best_tau, candidates).
    """
    from ..models import load_model
    from ..stages.train import example_gates, train

    out = Path(out)
    require_validation(validate)
    base_acc = validate(model)
    rows = []
    for tau in taus:
        tcfg = replace(train_cfg, tau=float(tau), max_steps=max_steps, checkpoint_every=max_steps)
        gates = example_gates(examples, tcfg, float(tau))
        n_comp = sum(len(e.completion_ids) for e in examples)
        frac = sum(int(g.sum()) for g in gates) / max(1, n_comp)
        if frac == 0:
            rows.append({"tau": float(tau), "gated_fraction": 0.0, "val_accuracy": None, "note": "empty gate"})
            continue
        res = train(
            examples,
            tcfg,
            out / f"tau-{float(tau):g}",
            model if not tcfg.full_finetune else load_model(model_spec)[0],  # LoRA: handed back unchanged
            tokenizer,
            base_spec=model_spec,
            validate=validate,
            shuffle=False,
            progress=progress,
            export=False,
            overwrite=overwrite,
        )
        rows.append(
            {
                "tau": float(tau),
                "gated_fraction": round(frac, 5),
                "val_accuracy": res["history"][-1].get("val_accuracy"),
                "steps": res["total_steps"],
            }
        )
    scored = [r for r in rows if r["val_accuracy"] is not None]
    if not scored:
        raise ReasonMaxxerError("calibrate: every candidate tau gives an empty gate; try lower values")
    best = max(scored, key=lambda r: (r["val_accuracy"], -abs(r["gated_fraction"] - 0.05)))
    result = {
        "base_val_accuracy": base_acc,
        "n_validation": validation_size(validate),
        "candidates": rows,
        "best_tau": best["tau"],
        "max_steps": max_steps,
    }
    md = calibrate_table(rows, base_acc, best)
    atomic_write_json(out / "calibrate.json", result)
    atomic_write_bytes(out / "calibrate.md", ("\n".join(md) + "\n").encode())
    result["markdown"] = "\n".join(md)
    return result


def validation_size(validate: Callable | None) -> int:
    """How many problems `validate` scores: the count its key records
    (`stages.evaluate.validation_accuracy_fn`); 0 for None or a callable without one."""
    return int((getattr(validate, "key", None) or {}).get("n", 0))


def require_validation(validate: Callable | None) -> None:
    """One line when there is nothing to choose tau on (before any scoring or training)."""
    if not validation_size(validate):
        raise ReasonMaxxerError(
            "calibrate: tau is chosen on validation problems; none are given (validation_problems; "
            "in Python, a `validate` from stages.evaluate.validation_accuracy_fn, whose key counts them)"
        )


def calibrate_table(rows: list[dict], base_acc: float, best: dict) -> list[str]:
    """calibrate.md's lines: the base's validation accuracy, then each candidate tau's gated
    fraction and validation accuracy, the chosen one (`best`) marked."""
    md = [
        "| tau (nats) | gated fraction | val accuracy |",
        "|---|---|---|",
        f"| (base, no training) | - | {base_acc:.3f} |",
    ]
    for r in rows:
        acc = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.3f}"
        md.append(f"| {r['tau']:g} | {r['gated_fraction']:.2%} | {acc}{' (best)' if r is best else ''} |")
    return md
