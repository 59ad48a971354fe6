"""How a training run is laid out and set up: the data order (`training_order`), the lr
schedule (`lr_at`), the run's plan (`plan_run`: tau, gates, examples kept, number of steps),
its output directory (`claim_out_dir`), the optimizer restored from the last checkpoint
(`prepare_optimizer`, `resume_state`, `trim_metrics`), the output head of the chunked loss
(`loss_head`, `use_chunked`), and each optimizer step's micro-batches (`step_inputs`).
`stages.train` runs the steps.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from ..backends.distributed import Dist
from ..core.gating import check_gate_nonempty, gated_fraction
from ..core.losses import loss_masks
from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, atomic_write_json, package_versions
from .adapter import Trainable
from .batch_loss import chunked_head
from .checkpoint import latest_checkpoint, load_trainable_state
from .train_data import TrainConfig, TrainExample, batch_tensors, example_gates, resolve_tau


def training_order(n: int, cfg: TrainConfig, shuffle: bool) -> list[int]:
    """Indices of examples for all epochs, concatenated (each epoch reshuffled with seed + epoch)."""
    total = max(1, math.ceil(cfg.epochs * n))
    order: list[int] = []
    ep = 0
    while len(order) < total:
        idx = list(range(n))
        if shuffle:
            random.Random(cfg.seed * 1000 + ep).shuffle(idx)
        order.extend(idx)
        ep += 1
    return order[:total]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then linear decay to 0 at `total` (step is 0-based), or
    at cfg.schedule_steps when set (the official recipe lays the schedule out for 200 steps and
    stops at max_steps = 149, so the lr never reaches 0)."""
    total = cfg.schedule_steps or total
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    rest = max(1, total - cfg.warmup_steps)
    return cfg.lr * max(0.0, 1 - (step - cfg.warmup_steps) / rest)


class RunPlan(NamedTuple):
    """The examples a run trains on, their gates, order and length (from `plan_run`)."""

    examples: list[TrainExample]
    gates: list[torch.Tensor]
    order: list[int]
    total_steps: int
    resolved: dict  # train_config.json


def plan_run(examples: Sequence[TrainExample], cfg: TrainConfig, shuffle: bool, base_spec: str) -> RunPlan:
    """tau, the gates, the examples kept (skip_ungated, rft), the order and number of steps."""
    tau, tau_source = resolve_tau(examples, cfg)
    gates = example_gates(examples, cfg, tau)
    all_gate = torch.cat(gates)[None]
    all_ent = torch.tensor([h for e in examples for h in e.entropies])
    if cfg.variant != "all_tokens":
        check_gate_nonempty(all_gate, tau, max_entropy=float(all_ent.max()) if all_ent.numel() else None)
    gfrac = gated_fraction(all_gate, torch.ones_like(all_gate))
    n_selected = len(examples)
    keep = range(len(examples))
    if cfg.skip_ungated and cfg.variant not in ("all_tokens", "rft"):
        keep = [i for i in keep if bool(gates[i].any())]
    if cfg.variant == "rft":  # SFT on the correct rollouts: the others contribute nothing
        keep = [i for i in keep if examples[i].advantage > 0]
    examples, gates = [examples[i] for i in keep], [gates[i] for i in keep]
    order = training_order(len(examples), cfg, shuffle)
    total_steps = math.ceil(len(order) / (cfg.micro_batch * cfg.grad_accum))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    resolved = {
        "config": json.loads(json.dumps(asdict(cfg))),
        "tau": tau,
        "tau_source": tau_source,
        "gated_fraction": gfrac,
        "n_examples": len(examples),
        "n_selected": n_selected,
        "total_steps": total_steps,
        "base": base_spec,
        "versions": package_versions(),
    }
    return RunPlan(examples, gates, order, total_steps, resolved)


def claim_out_dir(out: Path, resolved: dict, dist: Dist, overwrite: bool) -> None:
    """Write train_config.json, or check it matches the run already in `out` (resumption): the
    config, the examples, tau and the validation (compared when the old run recorded one: runs
    written before it was recorded resume as before); --overwrite clears a different run's
    checkpoints, metrics and exports first."""
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        keys = ("config", "n_examples", "tau") + (("validation",) if "validation" in old else ())
        changed = [k for k in keys if old.get(k) != resolved.get(k)]
        if changed:
            if not overwrite:
                raise ReasonMaxxerError(
                    f"{out}: holds a training run with a different {' and '.join(changed)}; choose another "
                    "--out or pass --overwrite"
                )
            if dist.is_main:
                for name in ("checkpoints", "adapter", "merged"):
                    shutil.rmtree(out / name, ignore_errors=True)
                for name in ("metrics.jsonl", "result.json"):
                    (out / name).unlink(missing_ok=True)
                atomic_write_json(cfg_path, resolved)
    elif dist.is_main:
        atomic_write_json(cfg_path, resolved)
    dist.barrier()


def resume_state(model, opt, ckdir: Path, full: bool, dist: Dist, say) -> tuple[int, list]:
    """Remove half-written checkpoints, load the last complete one. Returns (step, history)."""
    if dist.is_main:
        for stale in list(ckdir.glob(".step-*")) + list(ckdir.glob(".*.tmp")) + list(ckdir.parent.glob(".*.tmp")):
            # left by a process killed mid-write (checkpoints are temp + rename, so the real ones are intact)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    last = latest_checkpoint(ckdir)
    if last is None:
        return 0, []
    st = torch.load(last / "state.pt", weights_only=False)
    load_trainable_state(model, st["model"], full)
    if st["optim"] is not None and not dist.sharded:
        opt.load_state_dict(st["optim"])
    else:
        say("[train] the optimizer state is not restored (FSDP/DeepSpeed checkpoints hold weights only)")
    say(f"[train] resuming from {last.name}")
    return st["step"], st["extra"].get("history", [])


def trim_metrics(metrics_path: Path, start: int) -> None:
    """Keep metric lines up to the checkpoint we resume from (a torn last line is dropped)."""

    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    lines = [l for l in metrics_path.read_text().splitlines() if (step_of(l) or start + 1) <= start]
    atomic_write_bytes(metrics_path, "".join(l + "\n" for l in lines).encode())


def prepare_optimizer(trainable: Trainable, cfg: TrainConfig, ckdir: Path, dist: Dist, say):
    """AdamW over the trained parameters, restored from the last checkpoint in `ckdir` (if any),
    then handed to `dist.prepare`. Returns (model, opt, params, start step, history): the model
    and optimizer as `dist.prepare` returns them, and the parameters whose gradients are clipped."""
    model, frozen = trainable.model, trainable.frozen
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    start, history = resume_state(model, opt, ckdir, cfg.full_finetune, dist, say)
    model, opt = dist.prepare(model, opt, cfg.micro_batch)
    if dist.acc is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        if frozen is not None:
            frozen.to(dist.device)
    return model, opt, params, start, history


def step_inputs(plan: RunPlan, idx: Sequence[int], cfg: TrainConfig, pad: int):
    """One optimizer step's micro-batches: [(ids, att, completion)], their `LossMasks`, and each
    micro-batch's decision and anchor denominators (every process computes them from the full
    step): the step's counts (per_token), or [b] per-row tensors (per_sequence)."""
    batches, masks = [], []
    for a in range(0, len(idx), cfg.micro_batch):
        mb = idx[a : a + cfg.micro_batch]
        ids, att, comp, ent, adv, correct = batch_tensors([plan.examples[i] for i in mb], pad)
        gate = torch.zeros_like(comp)
        for j, i in enumerate(mb):
            gate[j, comp[j]] = plan.gates[i]
        batches.append((ids, att, comp))
        masks.append(
            loss_masks(
                cfg.variant,
                gate=gate,
                completion_mask=comp,
                attention_mask=att,
                advantages=adv,
                lam=cfg.lam,
                correct=correct,
            )
        )
    if cfg.normalisation == "per_sequence":
        # S = the step's sequences that take part (any decision or anchor position); row b's
        # terms are divided by S * its own count (OFFICIAL scripts/train_reasonmaxxer.py:1126-1130,
        # 1164-1169, 1183: per-sequence means, / grad_accum; core.losses module docstring)
        S = max(1, sum(int((m.decision | m.anchor).any(1).sum()) for m in masks))
        dec = [S * m.decision.sum(1).clamp(min=1).double() for m in masks]  # [b] each
        anc = [S * m.anchor.sum(1).clamp(min=1).double() for m in masks]
        return batches, masks, dec, anc
    dec_denom = max(1, sum(int(m.decision.sum()) for m in masks))
    anc_denom = max(1, sum(int(m.anchor.sum()) for m in masks))
    return batches, masks, [dec_denom] * len(masks), [anc_denom] * len(masks)


def loss_head(model, cfg: TrainConfig, dist: Dist):
    """The output head the chunked loss reads (`batch_loss.chunked_head`; None: the chunked loss
    does not apply to this model). loss_impl = 'chunked' without one is an error."""
    head = chunked_head(model)
    if cfg.loss_impl == "chunked" and (head is None or dist.sharded):
        raise ReasonMaxxerError(
            "train: loss_impl = 'chunked' needs a plain output head (no LoRA on lm_head, no logit soft-capping) "
            "and no FSDP/ZeRO-3 sharding; use loss_impl = 'logits'"
        )
    return head


CHUNKED_ABOVE_BYTES = 2**30  # loss_impl = "auto": the chunked loss above this many bytes of fp32 logits


def use_chunked(cfg: TrainConfig, head, ids: torch.Tensor, dist: Dist) -> bool:
    """Whether this micro-batch [B, T] takes the chunked loss (see TrainConfig.loss_impl)."""
    if head is None or dist.sharded or cfg.loss_impl == "logits":
        return False
    return cfg.loss_impl == "chunked" or ids.numel() * head.weight.shape[0] * 4 > CHUNKED_ABOVE_BYTES
