"""The decision gate: which completion positions get the advantage-weighted loss.

ReasonMaxxer trains only at the base model's high-entropy "forks" (method.md section 3):
D = {t in completion : H_t > tau}, with H_t the base model's full-vocabulary entropy
(nats, from `reasonmaxxer.scoring`) of the distribution that predicts token t. tau is a
fixed per-model threshold (paper sweep 1.0..2.2 nats, best 1.4, which gated 5.2% of
tokens); correct and incorrect rollouts may use different thresholds (`split_tau`).

Everything here is a pure function of (entropy, mask, tau); all tensors are [B, T] with
the same column convention as `score_sequences` (column t = token t). The random gate is
the paper's control: as many positions, chosen uniformly instead of by entropy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ReasonMaxxerError

__all__ = [
    "entropy_gate",
    "tau_for_fraction",
    "split_tau",
    "random_gate",
    "random_gate_like",
    "gated_fraction",
    "check_gate_nonempty",
    "count_for_fraction",
]


def _check_2d(name: str, x: Tensor, like: Tensor | None = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} != {tuple(like.shape)}")


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def count_for_fraction(n: int, fraction: float) -> int:
    """round(fraction * n), halves rounded up (so 0.5 of 5 tokens is 3, not Python's 2)."""
    _check_fraction(fraction)
    return min(n, int(math.floor(fraction * n + 0.5)))


def entropy_gate(entropy: Tensor, completion_mask: Tensor, tau: float | Tensor) -> Tensor:
    """Decision positions: completion & (entropy > tau).

    entropy: [B, T] nats; completion_mask: [B, T] bool/0-1 (True on generated tokens);
    tau: a scalar (nats) or a per-row [B] tensor (e.g. from `split_tau`).
    Returns a [B, T] bool tensor. Strict inequality: a position exactly at tau is not gated.
    """
    _check_2d("entropy", entropy)
    _check_2d("completion_mask", completion_mask, entropy)
    if isinstance(tau, Tensor):
        if tau.dim() == 0:
            tau_col = tau.to(entropy)
        elif tau.shape == (entropy.shape[0],):
            tau_col = tau.to(entropy)[:, None]  # [B, 1]
        else:
            raise ValueError(f"tau must be a scalar or [B]={entropy.shape[0]}, got shape {tuple(tau.shape)}")
    else:
        tau_col = float(tau)
    return completion_mask.bool() & (entropy > tau_col)  # [B, T]


def tau_for_fraction(entropy: Tensor, completion_mask: Tensor, fraction: float) -> float:
    """The threshold that gates ``fraction`` of the completion tokens: ~fraction have H > tau.

    With k = `count_for_fraction`(n, fraction) over the n completion tokens, tau is the
    (k+1)-th largest completion entropy, so exactly k positions exceed it when there are no
    ties (fewer, never more, with ties at tau). k = n gives a tau just below the minimum;
    k = 0 gives the maximum (nothing gated). Use it to translate a paper fraction (e.g.
    5.2%) into nats for a new model, or for the [80/20] batch-quantile gate (fraction 0.2).
    """
    _check_2d("entropy", entropy)
    _check_2d("completion_mask", completion_mask, entropy)
    values = entropy[completion_mask.bool()]  # [n], entropy's own dtype so tau compares exactly
    n = values.numel()
    if n == 0:
        raise ReasonMaxxerError("tau_for_fraction: the completion mask selects no tokens (are the completions empty?)")
    k = count_for_fraction(n, fraction)
    if k == n:
        lo = values.min()
        return torch.nextafter(lo, torch.tensor(-math.inf, dtype=lo.dtype)).item()
    return values.kthvalue(n - k).values.item()  # (n-k)-th smallest == (k+1)-th largest


def split_tau(correct: Tensor, tau_correct: float, tau_incorrect: float) -> Tensor:
    """Per-row thresholds: [B] bool (rollout is correct) -> [B] fp32 nats, for `entropy_gate`."""
    if correct.dim() != 1:
        raise ValueError(f"correct must be [B], got shape {tuple(correct.shape)}")
    return torch.where(
        correct.bool(),
        torch.tensor(float(tau_correct), device=correct.device),
        torch.tensor(float(tau_incorrect), device=correct.device),
    ).float()


def random_gate(completion_mask: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Control gate: exactly `count_for_fraction`(n, fraction) completion positions, uniform.

    completion_mask: [B, T]; n = completion tokens in the whole batch; positions are drawn
    without replacement over the batch (so per-row counts vary). ``generator`` is the only
    randomness used (pass ``torch.Generator().manual_seed(s)``). Returns [B, T] bool.
    To match an entropy gate's fraction: ``random_gate(m, gated_fraction(gate, m), g)``;
    to match its per-row counts, see `random_gate_like`.
    """
    _check_2d("completion_mask", completion_mask)
    mask = completion_mask.bool()
    idx = mask.reshape(-1).nonzero().squeeze(1)  # [n] flat indices of completion positions
    k = count_for_fraction(idx.numel(), fraction)
    perm = torch.randperm(idx.numel(), generator=generator, device=generator.device).to(idx.device)
    gate = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    gate[idx[perm[:k]]] = True
    return gate.reshape(mask.shape)


def random_gate_like(gate: Tensor, completion_mask: Tensor, generator: torch.Generator) -> Tensor:
    """Control gate with the same number of gated positions as ``gate`` in EVERY row.

    gate, completion_mask: [B, T]. Row b gets (gate & completion)[b].sum() positions drawn
    uniformly without replacement from its completion positions. Returns [B, T] bool.
    Stricter than `random_gate`: each rollout's weight in the decision term is unchanged.
    """
    _check_2d("completion_mask", completion_mask)
    _check_2d("gate", gate, completion_mask)
    mask = completion_mask.bool()
    counts = (gate.bool() & mask).sum(1).tolist()  # [B]
    out = torch.zeros_like(mask)
    for b, k in enumerate(counts):
        pos = mask[b].nonzero().squeeze(1)  # [n_b]
        perm = torch.randperm(pos.numel(), generator=generator, device=generator.device).to(pos.device)
        out[b, pos[perm[:k]]] = True
    return out


def gated_fraction(gate: Tensor, completion_mask: Tensor) -> float:
    """|gate & completion| / |completion| over the whole batch (a float in [0, 1])."""
    _check_2d("gate", gate)
    _check_2d("completion_mask", completion_mask, gate)
    m = completion_mask.bool()
    n = int(m.sum())
    if n == 0:
        raise ReasonMaxxerError("gated_fraction: the completion mask selects no tokens (are the completions empty?)")
    return int((gate.bool() & m).sum()) / n


def check_gate_nonempty(gate: Tensor, tau: float | Tensor, *, max_entropy: float | None = None) -> None:
    """Raise `ReasonMaxxerError` when ``gate`` selects nothing (the decision term would be 0).

    Call it on the gate of the whole training set (or a whole optimizer step), not a single
    micro-batch, where an empty gate is legitimate. ``max_entropy`` (the largest completion
    entropy, nats), when given, is quoted so the user can pick a tau below it.
    """
    if bool(gate.any()):
        return
    tau_s = f"{float(tau):.3g}" if not isinstance(tau, Tensor) or tau.numel() == 1 else f"{tau.tolist()}"
    hint = f"; the largest completion entropy is {max_entropy:.3g} nats" if max_entropy is not None else ""
    raise ReasonMaxxerError(
        f"entropy gate is empty: no completion token has base entropy > tau={tau_s} nats{hint}. "
        "Lower tau (the paper uses 1.2-1.8 nats for Qwen models; tau_for_fraction(entropy, mask, 0.05) "
        "gives the tau that gates 5% of tokens for this model)"
    )
