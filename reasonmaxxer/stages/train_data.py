"""What a training run trains on: its config (`TrainConfig`), the selected rollouts
(`TrainExample`, `examples_from_selection`), their padded tensors (`batch_tensors`), the
entropy threshold (`resolve_tau`) and each rollout's gate over its tokens (`example_gates`).
Pure functions of the config and the examples; `stages.train` runs the loop on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.gating import entropy_gate, random_gate_like, tau_for_fraction
from ..core.losses import LOSS_VARIANTS
from ..core.padding import pad_right
from ..errors import ReasonMaxxerError
from ..schema import check_fields

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
