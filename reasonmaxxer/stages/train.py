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
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..backends.distributed import Dist
from ..core.gating import check_gate_nonempty, entropy_gate, gated_fraction, random_gate_like, tau_for_fraction
from ..core.losses import DIAGNOSTICS, LOSS_VARIANTS, diagnostics_summary, loss_masks
from ..core.padding import pad_right
from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, atomic_write_json, package_versions
from ..schema import check_fields
from .batch_loss import chunked_head, chunked_micro_batch_loss, micro_batch_loss, shared_prefix_len
from .checkpoint import export_model, latest_checkpoint, load_trainable_state, save_checkpoint


def examples_from_selection(rows: Sequence[dict], truncated_policy: str) -> list[TrainExample]:
    return [
        TrainExample(
            prompt_ids=tuple(r["prompt_ids"]),
            completion_ids=tuple(r["token_ids"]),
            entropies=tuple(r["base_entropies"]),
            advantage=float(r["advantage"]),
            correct=bool(r["strict_correct"]),
            mask_decision=bool(truncated_policy == "mask" and r["truncated"]),
            key=(r["problem_id"], r["sample_index"]),
        )
        for r in rows
    ]


GATES = ("entropy", "random")
NORMALISATIONS = ("per_token", "per_sequence")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (defaults: the paper's recipe, method.md s.3)."""

    variant: str = field(
        default="reasonmaxxer",
        metadata={"help": "loss variant (core/losses.py registry)", "choices": lambda: tuple(LOSS_VARIANTS)},
    )
    gate: str = field(
        default="entropy",
        metadata={"help": "entropy | random (the entropy gate's count, at random positions)", "choices": GATES},
    )
    tau: float | None = field(default=None, metadata={"help": "entropy threshold, nats (default: tau_fraction)"})
    tau_fraction: float = field(
        default=0.05,
        metadata={"help": "if tau is unset: gate this fraction of completion tokens (quantile)", "gt": 0, "lt": 1},
    )
    tau_correct: float | None = field(default=None, metadata={"help": "separate threshold for correct rollouts, nats"})
    tau_incorrect: float | None = field(
        default=None, metadata={"help": "separate threshold for incorrect rollouts, nats"}
    )
    lam: float = field(default=0.2, metadata={"help": "anchor weight", "ge": 0})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank", "ge": 1})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha", "ge": 1})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout", "ge": 0, "lt": 1})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={"help": "LoRA target modules"}
    )
    full_finetune: bool = field(default=False, metadata={"help": "train all weights instead of a LoRA adapter"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate", "gt": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "ge": 0})
    warmup_steps: int = field(default=5, metadata={"help": "linear warmup, optimizer steps", "ge": 0})
    epochs: float = field(default=1.0, metadata={"help": "passes over the selected rollouts", "gt": 0})
    max_steps: int | None = field(default=None, metadata={"help": "cap on optimizer steps", "ge": 1})
    schedule_steps: int | None = field(
        default=None,
        metadata={"help": "lay the lr schedule out for this many steps (default: the run's own length)", "ge": 1},
    )
    micro_batch: int = field(default=1, metadata={"help": "sequences per forward pass", "ge": 1})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step", "ge": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm", "gt": 0})
    seed: int = field(default=0, metadata={"help": "training seed"})
    checkpoint_every: int = field(default=10, metadata={"help": "optimizer steps between checkpoints", "ge": 1})
    eval_every: int = field(default=0, metadata={"help": "validation every N steps (0: only at checkpoints)", "ge": 0})
    share_prefix: bool = field(
        default=True, metadata={"help": "encode the prompt prefix shared by a micro-batch once (exact; faster)"}
    )
    skip_ungated: bool = field(
        default=True, metadata={"help": "drop rollouts with no gated token (they would train the anchor only)"}
    )
    normalisation: str = field(
        default="per_token",
        metadata={
            "help": "per_token: each loss term is a mean over the step's tokens | per_sequence: each sequence's "
            "terms are means over its own tokens, then the mean over the step's sequences (the official code's)",
            "choices": NORMALISATIONS,
        },
    )
    loss_impl: str = field(
        default="auto",
        metadata={
            "help": "logits: the [B, T, V] logits, then the loss | chunked: from hidden states, one [chunk, V] "
            "block of logits at a time (real lengths and vocabularies) | auto: chunked when a micro-batch's "
            "fp32 logits would exceed 1 GiB",
            "choices": ("auto", "chunked", "logits"),
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each layer's activations in backward (less memory, ~1/3 more compute); "
            "micro-batches then run per row, without the shared-prefix cache"
        },
    )

    def __post_init__(self):
        check_fields(self, "train")


@dataclass(frozen=True)
class TrainExample:
    """One selected rollout. prompt_ids + completion_ids are the training sequence."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    entropies: tuple[float, ...]  # base entropy per completion token, nats
    advantage: float
    correct: bool
    mask_decision: bool = False  # e.g. truncated rollouts under truncated="mask"
    key: tuple = ()


# -- pure helpers --------------------------------------------------------------------------
def batch_tensors(examples: Sequence[TrainExample], pad_id: int):
    """Right-pad a micro-batch. Returns ids, attention, completion mask, entropy [b, T]; adv, correct [b]."""
    ids, att = pad_right([e.prompt_ids + e.completion_ids for e in examples], pad_id)  # [b, T]
    comp = torch.zeros(ids.shape, dtype=torch.bool)
    ent = torch.zeros(ids.shape, dtype=torch.float32)
    for i, e in enumerate(examples):
        p, c = len(e.prompt_ids), len(e.completion_ids)
        comp[i, p : p + c] = True
        ent[i, p : p + c] = torch.tensor(e.entropies, dtype=torch.float32)
    adv = torch.tensor([e.advantage for e in examples], dtype=torch.float32)
    correct = torch.tensor([e.correct for e in examples])
    return ids, att, comp, ent, adv, correct


def resolve_tau(examples: Sequence[TrainExample], cfg: TrainConfig) -> tuple[float, str]:
    """The entropy threshold (nats) and how it was chosen."""
    if cfg.tau is not None:
        return float(cfg.tau), "given"
    ent = torch.tensor([h for e in examples for h in e.entropies], dtype=torch.float32)
    if ent.numel() == 0:
        raise ReasonMaxxerError("train: the selected rollouts have no completion tokens")
    tau = tau_for_fraction(ent[None], torch.ones_like(ent[None], dtype=torch.bool), cfg.tau_fraction)
    return float(tau), f"quantile: top {cfg.tau_fraction:.1%} of completion-token entropies"


def example_gates(examples: Sequence[TrainExample], cfg: TrainConfig, tau: float) -> list[torch.Tensor]:
    """Per-example bool gate over its completion tokens (entropy or random, seeded)."""
    gates = []
    for e in examples:
        t = tau
        if cfg.tau_correct is not None and e.correct:
            t = cfg.tau_correct
        elif cfg.tau_incorrect is not None and not e.correct:
            t = cfg.tau_incorrect
        h = torch.tensor(e.entropies, dtype=torch.float32)[None]
        g = entropy_gate(h, torch.ones_like(h, dtype=torch.bool), t)[0]
        if e.mask_decision:
            g = torch.zeros_like(g)
        gates.append(g)
    if cfg.gate == "random":
        gen = torch.Generator().manual_seed(cfg.seed + 7919)
        # same number of gated tokens overall, uniformly random completion positions
        flat = torch.cat(gates)[None]
        rnd = random_gate_like(flat, torch.ones_like(flat), gen)[0]
        out, i = [], 0
        for g in gates:
            out.append(rnd[i : i + len(g)])
            i += len(g)
        gates = out
    return gates


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


# -- model set-up --------------------------------------------------------------------------
HALF = (torch.bfloat16, torch.float16)


class Trainable(NamedTuple):
    """What `attach_adapter` makes of a model for training."""

    model: object  # the PeftModel (LoRA) or the model itself (full fine-tune), in train mode
    frozen: object | None  # full fine-tune: a frozen copy of the base, for the anchor; LoRA: None
    autocast: torch.dtype | None  # full fine-tune of a bf16/fp16 model: forward under autocast to it
    export_dtype: torch.dtype  # the dtype the model came in: the merged checkpoint is saved in it


def attach_adapter(model, cfg: TrainConfig) -> Trainable:
    """LoRA (default) or full fine-tune, with fp32 weights wherever they are trained.

    LoRA: the adapter's weights are fp32 whatever the base's dtype (PEFT's
    ``autocast_adapter_dtype``, peft/tuners/tuners_utils.py ``cast_adapter_dtype``, checked
    here); the base stays in its dtype, frozen. Full fine-tune of a bf16/fp16 model: the
    model is cast to fp32 (master weights, AdamW state in fp32) and the forward runs under
    autocast to the original dtype. A bf16 weight under AdamW at lr 1e-5 would otherwise
    mostly not move: updates below half its 2^-8 relative spacing round away. The frozen
    copy for the anchor keeps the original dtype. `detach_adapter` undoes the LoRA wrapping.
    """
    torch.manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    if cfg.gradient_checkpointing:
        # non-reentrant: gradients reach LoRA weights inside checkpointed layers even though the
        # frozen embeddings' outputs need no grad (transformers' enable_input_require_grads is
        # the reentrant variant's workaround; added too, it is harmless)
        set_checkpointing(model, True)
        if not cfg.full_finetune:
            model.enable_input_require_grads()
    if cfg.full_finetune:
        import copy

        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        autocast = dtype if dtype in HALF else None
        if autocast is not None:
            model.float()
        model.train()
        return Trainable(model, frozen, autocast, dtype)
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ReasonMaxxerError(
            f"train: LoRA target modules {missing} not found in the model (it has e.g. "
            f"{sorted(n for n in names if n.endswith('proj'))[:8]})"
        )
    lc = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, lc, autocast_adapter_dtype=True)
    for p in pm.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    pm.train()
    return Trainable(pm, None, None, dtype)


def detach_adapter(trainable: Trainable) -> None:
    """Give the caller its model back: a LoRA model loses its adapter layers (PEFT's ``unload``,
    no merge: the base weights were never changed) and returns to eval mode. A full
    fine-tune's model keeps its trained (fp32) weights: the caller passed it to be trained."""
    if trainable.frozen is None and hasattr(trainable.model, "unload"):
        model = trainable.model.unload()
    else:
        model = trainable.model
    if set_checkpointing(model, False) and hasattr(model, "_require_grads_hook"):  # enable_input_require_grads
        model.disable_input_require_grads()
    model.eval()


def set_checkpointing(model, on: bool) -> bool:
    """Turn transformers' activation checkpointing on (non-reentrant) or off. Returns whether it
    was on before. transformers >= 5.2x names it activation_checkpointing_*, earlier 5.x
    gradient_checkpointing_* (kept as a deprecated alias)."""
    new = hasattr(model, "activation_checkpointing_enable")
    was = bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif was:
        model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()
    return was


# -- the loop ------------------------------------------------------------------------------
LOSS_HINT = ". Lower --lr or check the data"


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
    """Write train_config.json, or check it matches the run already in `out` (resumption);
    --overwrite clears a different run's checkpoints, metrics and exports first."""
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        keys = ("config", "n_examples", "tau")
        if any(old.get(k) != resolved[k] for k in keys):
            if not overwrite:
                raise ReasonMaxxerError(
                    f"{out}: holds a training run with a different config; choose another --out or pass --overwrite"
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


CHUNKED_ABOVE_BYTES = 2**30  # loss_impl = "auto": the chunked loss above this many bytes of fp32 logits


def use_chunked(cfg: TrainConfig, head, ids: torch.Tensor, dist: Dist) -> bool:
    """Whether this micro-batch [B, T] takes the chunked loss (see TrainConfig.loss_impl)."""
    if head is None or dist.sharded or cfg.loss_impl == "logits":
        return False
    return cfg.loss_impl == "chunked" or ids.numel() * head.weight.shape[0] * 4 > CHUNKED_ABOVE_BYTES


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
    `validate` (a collective, e.g. `greedy_accuracy_fn`'s, that splits the problems over them).
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

    model, frozen = trainable.model, trainable.frozen
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    ckdir = out / "checkpoints"
    start, history = resume_state(model, opt, ckdir, cfg.full_finetune, dist, say)
    model, opt = dist.prepare(model, opt, cfg.micro_batch)
    if dist.acc is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        if frozen is not None:
            frozen.to(dist.device)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.is_file() and dist.is_main:
        trim_metrics(metrics_path, start)
    head = chunked_head(model)  # None: the chunked loss does not apply to this model
    if cfg.loss_impl == "chunked" and (head is None or dist.sharded):
        raise ReasonMaxxerError(
            "train: loss_impl = 'chunked' needs a plain output head (no LoRA on lm_head, no logit soft-capping) "
            "and no FSDP/ZeRO-3 sharding; use loss_impl = 'logits'"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = dist.device if dist.acc is not None else next(model.parameters()).device
    total_steps, per_step = plan.total_steps, cfg.micro_batch * cfg.grad_accum
    show = progress and dist.is_main
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not show, dynamic_ncols=True)

    def fail(what: str, detail: str = "", hint: str = ""):
        bar.close()
        raise ReasonMaxxerError(
            f"train: non-finite {what} at step {step + 1}{detail}; the step was not applied; "
            f"last good checkpoint: {latest_checkpoint(ckdir) or 'none'}{hint}"
        )

    t_run = time.time()
    for step in range(start, total_steps):
        t0 = time.time()
        idx = plan.order[step * per_step : (step + 1) * per_step]
        batches, masks, dec_denom, anc_denom = step_inputs(plan, idx, cfg, pad)
        lr = lr_at(step, total_steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        agg = {"loss": 0.0, "decision": 0.0, "anchor": 0.0, "gated_tokens": 0, "anchor_tokens": 0}
        agg.update({k: 0 if k.endswith("_tokens") else 0.0 for k in DIAGNOSTICS})
        ntok, bad = 0, False
        passes = dist.passes(len(batches))
        for j, (k, weight) in enumerate(passes):
            ids, att, comps = (t.to(dev) for t in batches[k])
            m = masks[k]
            m = type(m)(m.advantages.to(dev), m.decision.to(dev), m.anchor.to(dev), m.lam)
            # transformers drops the KV cache in checkpointed layers (modeling_layers.py,
            # GradientCheckpointingLayer): the shared-prefix path needs it, so rows run whole
            shared = cfg.share_prefix and not dist.sharded and not cfg.gradient_checkpointing
            P = shared_prefix_len(ids, att, comps) if shared else 0
            amp = torch.autocast(dev.type, dtype=trainable.autocast) if trainable.autocast else nullcontext()
            loss_fn = chunked_micro_batch_loss if use_chunked(cfg, head, ids, dist) else micro_batch_loss
            with dist.micro_pass(model, last=j == len(passes) - 1):
                with amp:
                    loss, stats = loss_fn(model, frozen, ids, att, m, P, dec_denom[k], anc_denom[k])
                if weight and not torch.isfinite(loss):
                    if dist.acc is None:
                        fail("loss", f" (decision {stats['decision']}, anchor {stats['anchor']})", LOSS_HINT)
                    bad = True  # the other processes must finish the step's collectives first
                if dist.deepspeed and j == len(passes) - 1 and dist.sum([float(bad)])[0]:
                    # DeepSpeed applies the optimizer step inside the boundary pass's backward
                    # (accelerate/utils/deepspeed.py, DeepSpeedEngineWrapper.backward): check first
                    fail("loss", " on some process, before DeepSpeed's step", LOSS_HINT)
                dist.backward(loss, weight)
            if weight:
                for key in agg:
                    agg[key] += stats[key]
                ntok += int(att.sum())
        if dist.acc is not None:  # the step's totals over the processes
            tot = dist.sum([*agg.values(), ntok, float(bad)])
            agg = {key: int(v) if key.endswith("_tokens") else v for key, v in zip(agg, tot)}
            ntok = int(tot[-2])
            if tot[-1]:
                fail("loss", f" (decision {agg['decision']}, anchor {agg['anchor']}, summed over processes)", LOSS_HINT)
        gn = dist.clip_grad_norm(model, params, cfg.max_grad_norm)
        if not torch.isfinite(gn):
            fail("gradient norm")
        opt.step()
        dt = time.time() - t0
        comp_tokens = sum(len(plan.examples[i].completion_ids) for i in idx)
        rec = {
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
        is_ck = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps
        # every process calls validate (a collective that splits the problems, e.g. greedy_accuracy_fn)
        if validate is not None and (is_ck or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            inner = dist.unwrap(model)
            inner.eval()
            rec["val_accuracy"] = float(validate(inner))
            inner.train()
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if tracker is not None:
                tracker.log(rec, step + 1)
        bar.update(1)
        bar.set_postfix_str(
            f"loss {agg['loss']:.3f} gated {rec['gated_fraction']:.1%} {rec['tokens_per_s']:.0f} tok/s", refresh=False
        )
        if is_ck:
            history.append({"step": step + 1, "val_accuracy": rec.get("val_accuracy")})
            if dist.is_main or dist.sharded:  # gathering FSDP/DeepSpeed shards takes every process
                state = dist.trainable_state(model, cfg.full_finetune)
            if dist.is_main:
                save_checkpoint(
                    ckdir, step + 1, state, None if dist.sharded else opt.state_dict(), {"history": history}
                )
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
