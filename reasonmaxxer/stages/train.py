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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backends.distributed import Dist
from ..core.entropy import token_logprobs
from ..core.gating import check_gate_nonempty, entropy_gate, gated_fraction, random_gate_like, tau_for_fraction
from ..core.losses import LOSS_VARIANTS, anchor_kl, loss_masks, reasonmaxxer_loss
from ..core.padding import pad_right
from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, atomic_write_json, package_versions
from ..models import cache_kwarg
from ..schema import check_fields
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
    """Linear warmup over warmup_steps, then linear decay to 0 at `total` (step is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    rest = max(1, total - cfg.warmup_steps)
    return cfg.lr * max(0.0, 1 - (step - cfg.warmup_steps) / rest)


# -- model set-up --------------------------------------------------------------------------
def attach_adapter(model, cfg: TrainConfig):
    """LoRA (default) or full fine-tune. Returns (trainable model, base_logits_fn context)."""
    torch.manual_seed(cfg.seed)
    if cfg.full_finetune:
        import copy

        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        model.train()
        return model, frozen
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
    pm = get_peft_model(model, lc)
    pm.train()
    return pm, None


def _unwrapped(model):
    """The model inside a DDP/FSDP/DeepSpeed wrapper (the model itself when not wrapped)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def shared_prefix_len(ids: torch.Tensor, att: torch.Tensor, completion: torch.Tensor | None = None) -> int:
    """Length P of the token prefix shared by every row of a right-padded batch [B, T].

    P stays inside every row's prompt (P < first completion position, when `completion` [B, T]
    is given) and below the shortest row; 0 for a single row (nothing to share).
    """
    if ids.shape[0] < 2:
        return 0
    lengths = att.sum(1)
    same = (ids == ids[:1]).all(0) & att.bool().all(0)  # [T]
    p = int(same.long().cumprod(0).sum())
    p = min(p, int(lengths.min()) - 1)
    if completion is not None and completion.any():
        first = torch.where(completion.any(1), completion.float().argmax(1), lengths)  # [B]
        p = min(p, int(first.min()) - 1)
    return max(0, p)


def split_prefix_logits(model, ids: torch.Tensor, att: torch.Tensor, prefix_len: int):
    """(prefix logits [1, P, V] or None, remainder logits [B, T - P, V]) of a right-padded batch.

    The first `prefix_len` tokens are identical in every row (the few-shot examples, the system
    prompt): they go through the model once (batch 1), their KV cache is broadcast to the B rows
    and each row's remainder attends to it. Together the two parts equal ``model(ids, att).logits``
    (up to float rounding); gradients flow through the shared part once, summed over the rows
    that use it, which is what the per-row computation gives, at a fraction of the compute.
    """
    B, T = ids.shape
    if prefix_len <= 0:
        return None, model(input_ids=ids, attention_mask=att).logits
    kw = cache_kwarg(model)
    out = model(input_ids=ids[:1, :prefix_len], use_cache=True)
    cache = out[kw] if kw in out else out["past_key_values"]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(B, -1, -1, -1)
        layer.values = layer.values.expand(B, -1, -1, -1)
    mask = torch.cat([torch.ones((B, prefix_len), dtype=att.dtype, device=att.device), att[:, prefix_len:]], 1)
    pos = (prefix_len + torch.arange(T - prefix_len, device=ids.device)).expand(B, -1)
    rest = model(
        input_ids=ids[:, prefix_len:], attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}
    ).logits
    return out.logits, rest


def shared_prefix_logits(model, ids: torch.Tensor, att: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """The full logits [B, T, V] computed with `split_prefix_logits` (for checks and scoring)."""
    pre, rest = split_prefix_logits(model, ids, att, prefix_len)
    return rest if pre is None else torch.cat([pre.expand(ids.shape[0], -1, -1), rest], 1)


def micro_batch_loss(model, frozen, ids, att, m, prefix_len: int, dec_denom: float, anc_denom: float):
    """`reasonmaxxer_loss` of one micro-batch, its shared prefix encoded and anchored once.

    ids/att [B, T] right-padded; m: the variant's `LossMasks` ([B, T], column t = token t).
    Columns 1..P (P = prefix_len) are predicted by the shared prefix logits, identical in every
    row and never gated (prompt tokens): their anchor KL is computed once and weighted by the
    number of rows anchored there. Columns P+1.. come from each row's own logits. Equal, up to
    float rounding, to the plain per-row computation (tested).
    """
    P = prefix_len
    pre_t, rest_t = split_prefix_logits(model, ids, att, P)
    with torch.no_grad():
        if frozen is not None:
            pre_b, rest_b = split_prefix_logits(frozen, ids, att, P)
        else:
            with _unwrapped(model).disable_adapter():  # forward through the wrapper (FSDP gathers there)
                pre_b, rest_b = split_prefix_logits(model, ids, att, P)
    logits, base = rest_t[:, :-1], rest_b[:, :-1]  # predict columns P+1 .. T-1
    loss, stats = reasonmaxxer_loss(
        token_logprob=token_logprobs(logits, ids[:, P + 1 :]),
        logits_theta=logits,
        logits_base=base,
        advantages=m.advantages,
        gate=m.decision[:, P + 1 :],
        anchor_mask=m.anchor[:, P + 1 :],
        lam=m.lam,
        dec_denom=dec_denom,
        anc_denom=anc_denom,
    )
    if P == 0:
        return loss, stats
    if m.decision[:, 1 : P + 1].any():
        raise ValueError("shared prefix positions cannot be gated (they are prompt tokens)")
    pre_anchor = m.anchor[:, 1 : P + 1]  # [B, P]
    rows = pre_anchor.all(1)
    if not torch.equal(rows, pre_anchor.any(1)):
        raise ValueError("anchor mask must be uniform over the shared prefix")
    w = int(rows.sum())
    if w and m.lam:
        kl = anchor_kl(pre_b, pre_t, torch.ones((1, P), dtype=torch.bool, device=pre_t.device), denom=anc_denom / w)
        loss = loss + m.lam * kl
        stats["anchor"] += float(kl.detach())
        stats["anchor_tokens"] += w * P
        stats["loss"] = float(loss.detach())
    return loss, stats


# -- the loop ------------------------------------------------------------------------------
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
) -> dict:
    """Train on `examples` (already in training order if shuffle=False). Returns result.json's dict.

    validate(model) -> held-out accuracy, called at each checkpoint; the final checkpoint is
    the one with the best validation accuracy (ties: the later one). Without `validate`, the
    last checkpoint is selected.

    Under `accelerate launch` with N processes (see `distributed`), every process calls this with
    the same arguments; the step's micro-batches are split over the processes, and only the main
    process writes train_config.json, metrics, checkpoints and exports. Every process calls
    `validate` (a collective, e.g. `greedy_accuracy_fn`'s, that splits the problems over them).
    `out_dir` must be on a filesystem every process sees (for resumption and result.json).
    """
    from tqdm.auto import tqdm

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
    tau, tau_source = resolve_tau(examples, cfg)
    gates = example_gates(examples, cfg, tau)
    all_gate = torch.cat(gates)[None]
    all_ent = torch.tensor([h for e in examples for h in e.entropies])
    if cfg.variant != "all_tokens":
        check_gate_nonempty(all_gate, tau, max_entropy=float(all_ent.max()) if all_ent.numel() else None)
    gfrac = gated_fraction(all_gate, torch.ones_like(all_gate))
    n_selected = len(examples)
    if cfg.skip_ungated and cfg.variant not in ("all_tokens", "rft"):
        keep = [i for i, g in enumerate(gates) if bool(g.any())]
        examples, gates = [examples[i] for i in keep], [gates[i] for i in keep]
    if cfg.variant == "rft":  # SFT on the correct rollouts: the others contribute nothing
        keep = [i for i, e in enumerate(examples) if e.advantage > 0]
        examples, gates = [examples[i] for i in keep], [gates[i] for i in keep]

    order = training_order(len(examples), cfg, shuffle)
    per_step = cfg.micro_batch * cfg.grad_accum
    total_steps = math.ceil(len(order) / per_step)
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
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old.get("config") != resolved["config"] or old.get("n_examples") != len(examples) or old.get("tau") != tau:
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
    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())

    model, frozen = attach_adapter(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    ckdir = out / "checkpoints"
    if dist.is_main:
        for stale in list(ckdir.glob(".step-*")) + list(ckdir.glob(".*.tmp")) + list(out.glob(".*.tmp")):
            # left by a process killed mid-write (checkpoints are temp + rename, so the real ones are intact)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    start, history = 0, []
    last = latest_checkpoint(ckdir)
    if last is not None:
        st = torch.load(last / "state.pt", weights_only=False)
        load_trainable_state(model, st["model"], cfg.full_finetune)
        if st["optim"] is not None and not dist.sharded:
            opt.load_state_dict(st["optim"])
        elif progress and dist.is_main:
            print(
                "[train] the optimizer state is not restored (FSDP/DeepSpeed checkpoints hold weights only)", flush=True
            )
        start, history = st["step"], st["extra"].get("history", [])
        if progress and dist.is_main:
            print(f"[train] resuming from {last.name}", flush=True)
    model, opt = dist.prepare(model, opt, cfg.micro_batch)
    if dist.acc is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        if frozen is not None:
            frozen.to(dist.device)
    metrics_path = out / "metrics.jsonl"
    if (
        metrics_path.is_file() and dist.is_main
    ):  # keep metric lines up to the checkpoint we resume from (a torn last line is dropped)

        def _step(line):
            try:
                return json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                return None

        lines = [l for l in metrics_path.read_text().splitlines() if (_step(l) or start + 1) <= start]
        atomic_write_bytes(metrics_path, "".join(l + "\n" for l in lines).encode())

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = dist.device if dist.acc is not None else next(model.parameters()).device
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
    )

    def fail(what: str, detail: str = "", hint: str = ""):
        bar.close()
        raise ReasonMaxxerError(
            f"train: non-finite {what} at step {step + 1}{detail}; the step was not applied; "
            f"last good checkpoint: {latest_checkpoint(ckdir) or 'none'}{hint}"
        )

    t_run = time.time()
    for step in range(start, total_steps):
        t0 = time.time()
        idx = order[step * per_step : (step + 1) * per_step]
        micro = [idx[i : i + cfg.micro_batch] for i in range(0, len(idx), cfg.micro_batch)]
        batches, masks = [], []
        for mb in micro:
            exs = [examples[i] for i in mb]
            ids, att, comp, ent, adv, correct = batch_tensors(exs, pad)
            gate = torch.zeros_like(comp)
            for j, i in enumerate(mb):
                gate[j, comp[j]] = gates[i]
            batches.append((ids, att, comp))
            masks.append(
                loss_masks(
                    cfg.variant, gate=gate, completion_mask=comp, attention_mask=att, advantages=adv, lam=cfg.lam
                )
            )
        # denominators of the whole step (every process computes them from the step's full example list)
        dec_denom = max(1, sum(int(m.decision.sum()) for m in masks))
        anc_denom = max(1, sum(int(m.anchor.sum()) for m in masks))
        lr = lr_at(step, total_steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        agg = {"loss": 0.0, "decision": 0.0, "anchor": 0.0, "gated_tokens": 0, "anchor_tokens": 0}
        ntok, bad = 0, False
        passes = dist.passes(len(batches))
        for j, (k, weight) in enumerate(passes):
            ids, att, comps = (t.to(dev) for t in batches[k])
            m = masks[k]
            m = type(m)(m.advantages.to(dev), m.decision.to(dev), m.anchor.to(dev), m.lam)
            P = shared_prefix_len(ids, att, comps) if cfg.share_prefix and not dist.sharded else 0
            with dist.micro_pass(model, last=j == len(passes) - 1):
                loss, stats = micro_batch_loss(model, frozen, ids, att, m, P, dec_denom, anc_denom)
                if weight and not torch.isfinite(loss):
                    if dist.acc is None:
                        fail("loss", f" (decision {stats['decision']}, anchor {stats['anchor']})", LOSS_HINT)
                    bad = True  # the other processes must finish the step's collectives first
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
        comp_tokens = sum(len(examples[i].completion_ids) for i in idx)
        rec = {
            "step": step + 1,
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in agg.items()},
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

    if dist.is_main:
        # select the checkpoint: best validation accuracy (ties -> later), else the last
        scored = [h for h in history if h.get("val_accuracy") is not None]
        chosen = max(scored, key=lambda h: (h["val_accuracy"], h["step"])) if scored else history[-1]
        st = torch.load(ckdir / f"step-{chosen['step']:06d}" / "state.pt", weights_only=False)
        inner = dist.unwrap(model)
        if not dist.sharded:
            load_trainable_state(inner, st["model"], cfg.full_finetune)
        result = {
            "selected_step": chosen["step"],
            "selected_val_accuracy": chosen.get("val_accuracy"),
            "history": history,
            "tau": tau,
            "tau_source": tau_source,
            "gated_fraction": gfrac,
            "train_seconds": round(time.time() - t_run, 1),
            "total_steps": total_steps,
        }
        if export:
            result.update(
                export_model(
                    inner,
                    tokenizer,
                    out,
                    base_spec,
                    cfg.full_finetune,
                    trained_state=st["model"] if dist.sharded else None,
                )
            )
        atomic_write_json(out / "result.json", result)
    dist.barrier()
    return result if dist.is_main else json.loads((out / "result.json").read_text())
