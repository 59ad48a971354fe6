"""Distillation of a tuned teacher into a LoRA student of the base, one rank per run dir.

The loss is the forward KL(teacher || student) over the full vocabulary, averaged over the
matched positions of an optimizer step: exactly the anchor term of `core.chunked`'s loss with
the teacher's hidden states and head as the "base" side (`chunked_head_loss(hidden_student,
hidden_teacher, weight=student head, weight_base=teacher head, anc_weight=1/N, dec_weight=0)`),
so no [B, T, V] logits exist. Positions: every completion token ("all") or the base's
high-entropy forks ("gated", tau from the base entropies as in `stages.train`).

`distill_rank` writes, under ``out_dir`` (like `stages.train.train`): train_config.json,
metrics.jsonl (one line per step: "kl" = the step's mean KL, nats), checkpoints/step-N/
(atomic, resumable), adapter/ (the student's PEFT adapter) and result.json. A dir holding
result.json is a finished rank: it is returned as is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backends.distributed import Dist
from ..core.chunked import chunked_head_loss
from ..errors import ReasonMaxxerError
from ..io import atomic_dir, atomic_write_json, package_versions
from ..schema import check_fields
from .adapter import attach_adapter, detach_adapter
from .batch_loss import chunked_head, shared_prefix_len, split_prefix
from .checkpoint import latest_checkpoint, save_adapter, save_checkpoint
from .train_data import TrainConfig, TrainExample, batch_tensors, example_gates, resolve_tau
from .train_setup import claim_out_dir, lr_at, resume_state, training_order, trim_metrics

POSITIONS = ("all", "gated")


@dataclass(frozen=True)
class DistillConfig:
    """One student's training (the LoRA rank is given per run; alpha = alpha_per_rank * rank)."""

    positions: str = field(default="all", metadata={"help": "all | gated (the base's forks)", "choices": POSITIONS})
    tau_fraction: float = field(default=0.05, metadata={"help": "gated: fraction of positions kept", "gt": 0, "lt": 1})
    alpha_per_rank: float = field(default=2.0, metadata={"help": "LoRA alpha / rank", "gt": 0})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={"help": "LoRA target modules"}
    )
    lr: float = field(default=2e-4, metadata={"help": "learning rate", "gt": 0})
    warmup_steps: int = field(default=5, metadata={"help": "linear warmup, optimizer steps", "ge": 0})
    epochs: float = field(default=1.0, metadata={"help": "passes over the teacher's rollouts", "gt": 0})
    max_steps: int | None = field(default=None, metadata={"help": "cap on optimizer steps", "ge": 1})
    micro_batch: int = field(default=4, metadata={"help": "sequences per forward pass", "ge": 1})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step", "ge": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm", "gt": 0})
    seed: int = field(default=0, metadata={"help": "training seed"})
    checkpoint_every: int = field(default=10, metadata={"help": "optimizer steps between checkpoints", "ge": 1})
    chunk: int = field(default=1024, metadata={"help": "positions per [chunk, V] block of logits", "ge": 1})

    def __post_init__(self):
        check_fields(self, "distill")

    def train_config(self, rank: int) -> TrainConfig:
        """The `stages.train` config of rank `rank` (LoRA set-up, schedule, order, tau)."""
        return TrainConfig(
            lora_rank=rank,
            lora_alpha=max(1, round(self.alpha_per_rank * rank)),
            target_modules=self.target_modules,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            epochs=self.epochs,
            max_steps=self.max_steps,
            micro_batch=self.micro_batch,
            grad_accum=self.grad_accum,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            tau_fraction=self.tau_fraction,
            loss_impl="chunked",
        )


def position_masks(examples: Sequence[TrainExample], cfg: DistillConfig) -> tuple[list[torch.Tensor], float | None]:
    """Per-example bool [c_i] of the completion positions to match, and tau (gated) or None."""
    if cfg.positions == "all":
        return [torch.ones(len(e.completion_ids), dtype=torch.bool) for e in examples], None
    tcfg = cfg.train_config(1)
    tau, _ = resolve_tau(examples, tcfg)
    return example_gates(examples, tcfg, tau), tau


def distill_loss(student, teacher, ids, att, sel, prefix_len: int, denom: float, chunk: int = 1024):
    """(loss, sum of KL over the matched rows) of one micro-batch: sum_i KL(p_teacher,i || q_student,i) / denom.

    ids/att [B, T] right-padded; sel [B, T] bool, column t = the prediction of token t (so only
    columns > prefix_len may be set). Both models need a plain output head (`chunked_head`)."""
    s_head, t_head = chunked_head(student), chunked_head(teacher)
    if s_head is None or t_head is None:
        raise ReasonMaxxerError(
            "distill: student and teacher need a plain output head (no LoRA on lm_head, no soft-cap)"
        )
    P = prefix_len
    if sel[:, : P + 1].any():
        raise ValueError(f"sel has columns <= prefix_len {P} set")
    _, rest_s = split_prefix(student, ids, att, P, "hidden")  # [B, T-P, H]
    with torch.no_grad():
        _, rest_t = split_prefix(teacher, ids, att, P, "hidden")
    pos = sel[:, P + 1 :].reshape(-1).nonzero().squeeze(1)  # [N] into the flattened [B, T-P-1]
    H = rest_s.shape[-1]

    def rows(x):  # [B, T-P, H] -> [N, H]: the hidden states predicting the matched columns
        return x[:, :-1].reshape(-1, H)[pos]

    w = torch.full((len(pos),), 1.0 / float(denom), device=ids.device)  # [N]
    loss, st = chunked_head_loss(
        rows(rest_s),
        rows(rest_t),
        s_head.weight,
        ids[:, P + 1 :].reshape(-1)[pos],
        torch.zeros_like(w),
        w,
        bias=s_head.bias,
        weight_base=t_head.weight,
        bias_base=t_head.bias,
        chunk=chunk,
    )
    return loss, st["anchor_kl_sum"]


def param_counts(peft_model) -> tuple[int, int]:
    """(trainable parameters, parameters of the model without the adapter)."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n)
    return trainable, total


def distill_rank(
    examples: Sequence[TrainExample],
    rank: int,
    cfg: DistillConfig,
    out_dir: str | Path,
    model,
    teacher,
    tokenizer,
    *,
    base_spec: str = "",
    teacher_spec: str = "",
    progress: bool = True,
) -> dict:
    """Train the rank-`rank` student of `model` (the base; handed back unchanged) to match
    `teacher` on `examples`; resumable. Returns result.json's dict (also for a finished dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    if not examples:
        raise ReasonMaxxerError("distill: no rollouts to distill on")
    tcfg = cfg.train_config(rank)
    masks, tau = position_masks(examples, cfg)
    order = training_order(len(examples), tcfg, shuffle=True)
    per = cfg.micro_batch * cfg.grad_accum
    total = -(-len(order) // per)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    resolved = {
        "config": {**json.loads(json.dumps(asdict(cfg))), "rank": rank},
        "tau": tau,
        "n_examples": len(examples),
        "positions": int(sum(int(m.sum()) for m in masks)),
        "total_steps": total,
        "base": base_spec,
        "teacher": teacher_spec,
        "versions": package_versions(),
    }
    if not resolved["positions"]:
        raise ReasonMaxxerError(
            f"distill: no position to match ({cfg.positions}; tau {tau}); use --positions all or check the base entropies"
        )
    dist = Dist.from_env()
    claim_out_dir(out, resolved, dist, overwrite=False)
    trainable = attach_adapter(model, tcfg)
    try:
        return _run(
            examples, masks, order, total, tcfg, cfg, out, trainable, teacher, tokenizer, dist, progress, base_spec
        )
    finally:
        detach_adapter(trainable)


def _run(examples, masks, order, total, tcfg, cfg, out, trainable, teacher, tokenizer, dist, progress, base_spec):
    model = trainable.model
    say = print if progress else (lambda *_: None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ckdir = out / "checkpoints"
    start, history = resume_state(model, opt, ckdir, False, dist, say)
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        trim_metrics(metrics, start)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    per = cfg.micro_batch * cfg.grad_accum
    t_run = time.time()
    for step in range(start, total):
        t0 = time.time()
        idx = order[step * per : (step + 1) * per]
        denom = max(1, sum(int(masks[i].sum()) for i in idx))
        for g in opt.param_groups:
            g["lr"] = lr = lr_at(step, total, tcfg)
        opt.zero_grad(set_to_none=True)
        kl = 0.0
        for a in range(0, len(idx), cfg.micro_batch):
            mb = idx[a : a + cfg.micro_batch]
            ids, att, comp, _, _, _ = batch_tensors([examples[i] for i in mb], pad)
            sel = torch.zeros_like(comp)
            for j, i in enumerate(mb):
                sel[j, comp[j]] = masks[i]
            ids, att, comp, sel = ids.to(dev), att.to(dev), comp.to(dev), sel.to(dev)
            if not sel.any():
                continue
            loss, kl_sum = distill_loss(
                model, teacher, ids, att, sel, shared_prefix_len(ids, att, comp), denom, cfg.chunk
            )
            if not torch.isfinite(loss):
                raise ReasonMaxxerError(
                    f"distill: non-finite KL at step {step + 1}; last good checkpoint: {latest_checkpoint(ckdir) or 'none'}"
                )
            loss.backward()
            kl += kl_sum / denom
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        rec = {"step": step + 1, "kl": round(kl, 6), "positions": denom, "grad_norm": round(float(gn), 6), "lr": lr}
        rec["seconds"] = round(time.time() - t0, 3)
        with open(metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            history.append({"step": step + 1, "kl": rec["kl"]})
            save_checkpoint(ckdir, step + 1, dist.trainable_state(model, False), opt.state_dict(), {"history": history})
    model.eval()
    adapter = atomic_dir(out / "adapter", lambda d: save_adapter(model, tokenizer, d, base_spec))
    trainable_n, total_n = param_counts(model)
    result = {
        "rank": tcfg.lora_rank,
        "total_steps": total,
        "final_kl": history[-1]["kl"] if history else None,
        "history": history,
        "trainable_params": trainable_n,
        "model_params": total_n,
        "trainable_pct": 100.0 * trainable_n / total_n,
        "adapter": str(adapter),
        "train_seconds": round(time.time() - t_run, 1),
    }
    atomic_write_json(out / "result.json", result)
    return result
