"""The ReasonMaxxer training loop: advantage-weighted log-likelihood at the forks, anchored
to the base everywhere else (method.md section 3). Functions, not a trainer class.

`train(examples, cfg, out_dir, model, tokenizer, ...)` takes already selected and scored
rollouts (`TrainExample`s: the token ids of prompt + completion, the completion's base
entropies, the rollout's advantage) and writes, under ``out_dir``::

    train_config.json            the resolved TrainConfig (+ tau actually used, gated fraction)
    metrics.jsonl                one line per optimizer step (loss terms, gated fraction,
                                 grad norm, lr, tokens/s, validation accuracy when evaluated)
    checkpoints/step-000010/     adapter (or full) weights + optimizer/scheduler/RNG state,
                                 each written to a temp dir and renamed (atomic)
    adapter/                     the PEFT adapter of the selected checkpoint
    merged/                      base + adapter merged: a plain HF checkpoint
    result.json                  which checkpoint was selected and why

The base distribution for the anchor is the same model with its LoRA adapter disabled
(no second copy in memory); a full fine-tune keeps a frozen copy (2x memory).

Resumption: re-running with the same out_dir continues from the last checkpoint; the data
order, gate and every random draw are functions of the config and seed, so a run killed
and resumed ends with the same weights as an uninterrupted run (tested on CPU with SIGKILL).
A non-finite loss stops the run (the step is not applied) with a clear error; the last good
checkpoint stays on disk.

Multi-process (`accelerate launch`, N processes): the same steps with the same effective batch,
each step's micro-batches split over the processes, gradients summed; one process writes the
files above. See `distributed` for how, and what is tested.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from ..backends.distributed import Dist
from ..core.losses import DIAGNOSTICS, diagnostics_summary
from ..errors import ReasonMaxxerError
from ..io import atomic_write_json
from .adapter import Trainable, attach_adapter, detach_adapter
from .batch_loss import chunked_micro_batch_loss, micro_batch_loss, shared_prefix_len
from .checkpoint import export_model, latest_checkpoint, load_trainable_state, save_checkpoint
from .train_data import (
    TrainConfig,
    TrainExample,
    batch_tensors,
    example_gates,
    examples_from_selection,
    resolve_tau,
)
from .train_setup import (
    CHUNKED_ABOVE_BYTES,
    RunPlan,
    claim_out_dir,
    loss_head,
    lr_at,
    plan_run,
    prepare_optimizer,
    step_inputs,
    training_order,
    trim_metrics,
    use_chunked,
)

# what other modules import from here (defined in train_data and train_setup)
__all__ = [
    "CHUNKED_ABOVE_BYTES",
    "TrainConfig",
    "TrainExample",
    "batch_tensors",
    "example_gates",
    "examples_from_selection",
    "lr_at",
    "resolve_tau",
    "train",
    "training_order",
]

LOSS_HINT = ". Lower --lr or check the data"


def train(
    examples: Sequence[TrainExample],
    cfg: TrainConfig,
    out_dir: str | Path,
    model,
    tokenizer,
    *,
    base_spec: str = "",
    validate: Callable[[object], float] | None = None,
    shuffle: bool = True,
    progress: bool = True,
    export: bool = True,
    overwrite: bool = False,
    tracker=None,
) -> dict:
    """Train on `examples` (already in training order if shuffle=False). Returns result.json's dict.

    validate(model) -> held-out accuracy, called at each checkpoint; the final checkpoint is
    the one with the best validation accuracy (ties: the later one). Without `validate`, the
    last checkpoint is selected.

    The model: with LoRA it is handed back unchanged when this returns (or fails): the
    adapter is removed, no copy is made. A full fine-tune trains its weights in place (in
    fp32, see `attach_adapter`): pass a model you do not need as the base afterwards.

    Under `accelerate launch` with N processes (see `distributed`), every process calls this with
    the same arguments; the step's micro-batches are split over the processes, and only the main
    process writes train_config.json, metrics, checkpoints and exports. Every process calls
    `validate` (a collective, e.g. `validation_accuracy_fn`'s, that splits the problems over them).
    `out_dir` must be on a filesystem every process sees (for resumption and result.json).

    tracker: a `tracking.make_tracker` object; the main process logs each step's metrics.jsonl
    record to it (``tracker.log(rec, step)``); closed when this returns or fails.
    """
    dist = Dist.from_env()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not examples:
        raise ReasonMaxxerError("train: no training examples")
    if validate is not None and dist.sharded:
        raise ReasonMaxxerError(
            "train: validation during training is not supported under FSDP/DeepSpeed; train "
            "without --validation and evaluate the checkpoints afterwards"
        )
    plan = plan_run(examples, cfg, shuffle, base_spec)
    # the validation that picks the checkpoint (`validation_accuracy_fn`'s key; None: none)
    plan.resolved["validation"] = None if validate is None else getattr(validate, "key", None)
    claim_out_dir(out, plan.resolved, dist, overwrite)
    if (out / "result.json").is_file():
        if tracker is not None:
            tracker.close()
        return json.loads((out / "result.json").read_text())
    trainable = attach_adapter(model, cfg)
    try:
        return run_steps(plan, cfg, out, trainable, tokenizer, dist, validate, progress, export, base_spec, tracker)
    finally:
        detach_adapter(trainable)
        if tracker is not None:
            tracker.close()


def run_steps(
    plan, cfg, out, trainable: Trainable, tokenizer, dist: Dist, validate, progress, export, base_spec, tracker=None
):
    """The optimizer steps of `train` (from the last checkpoint), then selection and export."""
    from tqdm.auto import tqdm

    def say(msg):
        if progress and dist.is_main:
            print(msg, flush=True)

    ckdir = out / "checkpoints"
    model, opt, params, start, history = prepare_optimizer(trainable, cfg, ckdir, dist, say)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.is_file() and dist.is_main:
        trim_metrics(metrics_path, start)
    head = loss_head(model, cfg, dist)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = dist.device if dist.acc is not None else next(model.parameters()).device
    show = progress and dist.is_main
    bar = tqdm(total=plan.total_steps, initial=start, desc="train", unit="step", disable=not show, dynamic_ncols=True)
    ctx = StepContext(plan, cfg, dist, trainable, model, opt, params, head, dev, pad, ckdir, bar)
    t_run = time.time()
    for step in range(start, plan.total_steps):
        rec, loss = optimizer_step(ctx, step)
        is_ck = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == plan.total_steps
        # every process calls validate (a collective that splits the problems, e.g. validation_accuracy_fn)
        if validate is not None and (is_ck or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            rec["val_accuracy"] = validation_accuracy(model, dist, validate)
        log_step(ctx, rec, loss, metrics_path, tracker)
        if is_ck:
            history.append({"step": step + 1, "val_accuracy": rec.get("val_accuracy")})
            save_step_checkpoint(ctx, step + 1, history)
    bar.close()
    t_run = round(time.time() - t_run, 1)
    result = None
    if dist.is_main:
        result = select_and_export(
            dist.unwrap(model), tokenizer, out, history, cfg, dist, export, base_spec, trainable, t_run
        )
        atomic_write_json(out / "result.json", result)
    dist.barrier()
    return result if dist.is_main else json.loads((out / "result.json").read_text())


class StepContext(NamedTuple):
    """What every optimizer step of `run_steps` uses (set up once, before the first step)."""

    plan: RunPlan
    cfg: TrainConfig
    dist: Dist
    trainable: Trainable  # for its autocast dtype and frozen copy
    model: object  # as `dist.prepare` returned it
    opt: torch.optim.Optimizer
    params: list  # the trained parameters, whose gradient norm is clipped
    head: object | None  # the chunked loss's output head (`loss_head`)
    dev: torch.device
    pad: int
    ckdir: Path
    bar: object  # the tqdm progress bar


def fail(ctx: StepContext, step: int, what: str, detail: str = "", hint: str = ""):
    """Stop the run on a non-finite loss or gradient norm at `step` (0-based), before it is applied."""
    ctx.bar.close()
    raise ReasonMaxxerError(
        f"train: non-finite {what} at step {step + 1}{detail}; the step was not applied; "
        f"last good checkpoint: {latest_checkpoint(ctx.ckdir) or 'none'}{hint}"
    )


def optimizer_step(ctx: StepContext, step: int) -> tuple[dict, float]:
    """One optimizer step (0-based `step`): the lr, the gradients of its micro-batches (summed
    over the processes), clipping and the update. Returns its metrics.jsonl record and loss."""
    t0 = time.time()
    cfg, plan = ctx.cfg, ctx.plan
    per_step = cfg.micro_batch * cfg.grad_accum
    idx = plan.order[step * per_step : (step + 1) * per_step]
    batches, masks, dec_denom, anc_denom = step_inputs(plan, idx, cfg, ctx.pad)
    lr = lr_at(step, plan.total_steps, cfg)
    for g in ctx.opt.param_groups:
        g["lr"] = lr
    ctx.opt.zero_grad(set_to_none=True)
    agg, ntok, bad = accumulate_gradients(ctx, step, batches, masks, dec_denom, anc_denom)
    if ctx.dist.acc is not None:  # the step's totals over the processes
        agg, ntok = sum_over_processes(ctx, step, agg, ntok, bad)
    gn = ctx.dist.clip_grad_norm(ctx.model, ctx.params, cfg.max_grad_norm)
    if not torch.isfinite(gn):
        fail(ctx, step, "gradient norm")
    ctx.opt.step()
    dt = time.time() - t0
    comp_tokens = sum(len(plan.examples[i].completion_ids) for i in idx)
    return step_record(step, agg, comp_tokens, gn, lr, ntok, dt), agg["loss"]


def accumulate_gradients(ctx: StepContext, step: int, batches, masks, dec_denom, anc_denom) -> tuple[dict, int, bool]:
    """Forward and backward of this process's micro-batches of the step (`Dist.passes`).
    Returns this process's summed loss stats, its token count, and whether a loss was not finite
    (then, launched, after the step's collectives; one process alone stops at once)."""
    cfg, dist, model = ctx.cfg, ctx.dist, ctx.model
    agg = {"loss": 0.0, "decision": 0.0, "anchor": 0.0, "gated_tokens": 0, "anchor_tokens": 0}
    agg.update({k: 0 if k.endswith("_tokens") else 0.0 for k in DIAGNOSTICS})
    ntok, bad = 0, False
    passes = dist.passes(len(batches))
    for j, (k, weight) in enumerate(passes):
        ids, att, comps = (t.to(ctx.dev) for t in batches[k])
        m = masks[k]
        m = type(m)(m.advantages.to(ctx.dev), m.decision.to(ctx.dev), m.anchor.to(ctx.dev), m.lam)
        # transformers drops the KV cache in checkpointed layers (modeling_layers.py,
        # GradientCheckpointingLayer): the shared-prefix path needs it, so rows run whole
        shared = cfg.share_prefix and not dist.sharded and not cfg.gradient_checkpointing
        P = shared_prefix_len(ids, att, comps) if shared else 0
        autocast = ctx.trainable.autocast
        amp = torch.autocast(ctx.dev.type, dtype=autocast) if autocast else nullcontext()
        loss_fn = chunked_micro_batch_loss if use_chunked(cfg, ctx.head, ids, dist) else micro_batch_loss
        with dist.micro_pass(model, last=j == len(passes) - 1):
            with amp:
                loss, stats = loss_fn(model, ctx.trainable.frozen, ids, att, m, P, dec_denom[k], anc_denom[k])
            if weight and not torch.isfinite(loss):
                if dist.acc is None:
                    fail(ctx, step, "loss", f" (decision {stats['decision']}, anchor {stats['anchor']})", LOSS_HINT)
                bad = True  # the other processes must finish the step's collectives first
            if dist.deepspeed and j == len(passes) - 1 and dist.sum([float(bad)])[0]:
                # DeepSpeed applies the optimizer step inside the boundary pass's backward
                # (accelerate/utils/deepspeed.py, DeepSpeedEngineWrapper.backward): check first
                fail(ctx, step, "loss", " on some process, before DeepSpeed's step", LOSS_HINT)
            dist.backward(loss, weight)
        if weight:
            for key in agg:
                agg[key] += stats[key]
            ntok += int(att.sum())
    return agg, ntok, bad


def sum_over_processes(ctx: StepContext, step: int, agg: dict, ntok: int, bad: bool) -> tuple[dict, int]:
    """The step's loss stats and token count summed over the processes; stops the run if any
    process had a non-finite loss."""
    tot = ctx.dist.sum([*agg.values(), ntok, float(bad)])
    agg = {key: int(v) if key.endswith("_tokens") else v for key, v in zip(agg, tot)}
    if tot[-1]:
        detail = f" (decision {agg['decision']}, anchor {agg['anchor']}, summed over processes)"
        fail(ctx, step, "loss", detail, LOSS_HINT)
    return agg, int(tot[-2])


def step_record(step: int, agg: dict, comp_tokens: int, gn, lr: float, ntok: int, dt: float) -> dict:
    """The metrics.jsonl record of optimizer step `step` (0-based; recorded 1-based)."""
    return {
        "step": step + 1,
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in agg.items() if k not in DIAGNOSTICS},
        **diagnostics_summary(agg),
        "gated_fraction": round(agg["gated_tokens"] / max(1, comp_tokens), 6),
        "grad_norm": round(float(gn), 6),
        "lr": lr,
        "tokens_per_s": round(ntok / dt, 1),
        "tokens": ntok,
        "seconds": round(dt, 3),
    }


def validation_accuracy(model, dist: Dist, validate: Callable[[object], float]) -> float:
    """validate(the unwrapped model) in eval mode; the model goes back to train mode."""
    inner = dist.unwrap(model)
    inner.eval()
    acc = float(validate(inner))
    inner.train()
    return acc


def log_step(ctx: StepContext, rec: dict, loss: float, metrics_path: Path, tracker) -> None:
    """Append `rec` to metrics.jsonl and the tracker (main process) and advance the progress bar."""
    if ctx.dist.is_main:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if tracker is not None:
            tracker.log(rec, rec["step"])
    ctx.bar.update(1)
    ctx.bar.set_postfix_str(
        f"loss {loss:.3f} gated {rec['gated_fraction']:.1%} {rec['tokens_per_s']:.0f} tok/s", refresh=False
    )


def save_step_checkpoint(ctx: StepContext, step: int, history: list) -> None:
    """Write checkpoints/step-<step>/ (1-based `step`) with the history so far (main process;
    gathering FSDP/DeepSpeed shards takes every process)."""
    dist = ctx.dist
    if dist.is_main or dist.sharded:
        state = dist.trainable_state(ctx.model, ctx.cfg.full_finetune)
    if dist.is_main:
        save_checkpoint(ctx.ckdir, step, state, None if dist.sharded else ctx.opt.state_dict(), {"history": history})


def select_and_export(
    inner, tokenizer, out: Path, history, cfg, dist, export, base_spec, trainable, train_seconds
) -> dict:
    """Load the selected checkpoint (best validation accuracy, ties -> later; else the last)
    into the model and write adapter/ and merged/ (`export_model`). Returns result.json's dict."""
    resolved = json.loads((out / "train_config.json").read_text())
    scored = [h for h in history if h.get("val_accuracy") is not None]
    chosen = max(scored, key=lambda h: (h["val_accuracy"], h["step"])) if scored else history[-1]
    st = torch.load(out / "checkpoints" / f"step-{chosen['step']:06d}" / "state.pt", weights_only=False)
    if not dist.sharded:
        load_trainable_state(inner, st["model"], cfg.full_finetune)
    result = {
        "selected_step": chosen["step"],
        "selected_val_accuracy": chosen.get("val_accuracy"),
        "history": history,
        "tau": resolved["tau"],
        "tau_source": resolved["tau_source"],
        "gated_fraction": resolved["gated_fraction"],
        "train_seconds": train_seconds,
        "total_steps": resolved["total_steps"],
        "export_dtype": str(trainable.export_dtype).replace("torch.", ""),
    }
    if export:
        trained_state = st["model"] if dist.sharded else None
        result.update(
            export_model(
                inner,
                tokenizer,
                out,
                base_spec,
                cfg.full_finetune,
                trained_state=trained_state,
                dtype=trainable.export_dtype,
                card=(resolved, result),
            )
        )
    return result
