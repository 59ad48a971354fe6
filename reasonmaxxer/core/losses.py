"""ReasonMaxxer's objective as pure tensor functions (method.md section 3).

    L = L_dec + lam * L_anchor                                       (lam = 0.2)
    L_dec    = - (1/|D|) sum_{(b,t) in D} A_b * log p_theta(x_t | x_<t)
    L_anchor =   (1/|M|) sum_{(b,t) in M} KL( p_base(.|x_<t) || p_theta(.|x_<t) )

D (the gate) holds the completion positions where the frozen base model's entropy is
above tau; M (the anchor mask) holds every other real prediction, prompt included. A_b is
the group-normalised advantage of rollout b among the G rollouts of its problem. Each
term is averaged over its own mask. This is advantage-weighted log-likelihood at fixed,
stored rollouts (no sampling, no importance ratio, no clipping): not RL.

Column convention: every [B, T] tensor here is indexed like `score_sequences`'s output,
column t = token t, described by the distribution that predicts it (the logits at t-1).
The loop therefore passes ``logits[:, :-1]`` with masks sliced ``[:, 1:]``.

Variants (the ablations of the paper, and ours) are entries of `LOSS_VARIANTS`. A
variant does not change the arithmetic, only what goes into it: it maps the batch's raw
masks to a `LossMasks` (decision mask, anchor mask, advantages, lam). Registered:

- ``reasonmaxxer`` (default): decision = gate & completion & (A != 0); anchor = the other valid
  positions. A rollout with A == 0 (a group whose rewards are all equal) has no decision term:
  its gated positions are anchored instead, as the official code does (OFFICIAL
  scripts/train_reasonmaxxer.py:1035-1036,1045: the decision mask is gate & (A > 0 | A < 0);
  :1155: the KL mask is every valid position outside it).
- ``positive_only``: only rollouts with A > 0 (the correct ones) are trained on; rows with
  A <= 0 drop out of BOTH terms and both denominators (paper: recovers about half the gain).
- ``positive_only_paper``: the official positive-only run: incorrect rollouts are dropped and
  every correct one gets A = 1 (all-correct groups included) (OFFICIAL
  scripts/prepare_training_data.py:218-219,254-255 ``--positive_only``). Needs ``correct``.
- ``no_anchor``: lam = 0 (decision term alone).
- ``all_tokens``: decision over every completion position, anchor over the prompt only.

The random-gate control is not a variant: it is a different gate
(`reasonmaxxer.gating.random_gate` / `random_gate_like`) fed to ``reasonmaxxer``.

How a training loop composes them (gradient accumulation over micro-batches)::

    adv = group_advantages(rewards, problem_ids)             # [N], once, over the data set
    gate = entropy_gate(base_entropy, completion_mask, tau)   # [N, T]; or random_gate(...)
    check_gate_nonempty(gate, tau)
    for step in steps:                                        # micro-batches mbs of rows
        masks = [loss_masks(variant, gate=gate[r], completion_mask=cm[r],
                            attention_mask=am[r], advantages=adv[r]) for r in mbs]
        dec_denom = sum(int(m.decision.sum()) for m in masks)  # over the WHOLE step, so the
        anc_denom = sum(int(m.anchor.sum()) for m in masks)    # result ignores the split
        for r, m in zip(mbs, masks):
            logits = model(ids[r], attention_mask=am[r]).logits[:, :-1]       # [b, T-1, V]
            with torch.no_grad(), model.disable_adapter():
                base = model(ids[r], attention_mask=am[r]).logits[:, :-1]
            loss, stats = reasonmaxxer_loss(
                token_logprob=token_logprobs(logits, ids[r][:, 1:]),
                logits_theta=logits, logits_base=base, advantages=m.advantages,
                gate=m.decision[:, 1:], anchor_mask=m.anchor[:, 1:], lam=m.lam,
                dec_denom=dec_denom, anc_denom=anc_denom)
            loss.backward()

Normalisation (`TrainConfig.normalisation`): with scalar denominators each term is a mean over
the step's tokens ("per_token"). Pass [B] tensors instead (one per row: S * that row's own
count, S = the step's number of sequences) and each sequence's terms are averaged over its own
tokens, then over the step's sequences ("per_sequence", the official code's: batch_size 1,
each sequence's loss is its own decision mean + lam * its own KL mean, divided by grad_accum,
OFFICIAL scripts/train_reasonmaxxer.py:1126-1130,1164-1169,1173,1183 with --batch_size 1; a
sequence with no decision token contributes a decision term of 0 and still counts in S,
:1131-1132). Official normalisation has no other mode in the paper's run (no
--normalize_by_problem, no --separate_pos_neg_norm: :1032-1033, :1106).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ReasonMaxxerError

__all__ = [
    "group_advantages",
    "masked_sum_and_count",
    "decision_loss",
    "anchor_kl",
    "decision_diagnostics",
    "DIAGNOSTICS",
    "diagnostics_summary",
    "LossMasks",
    "LOSS_VARIANTS",
    "register_loss",
    "loss_masks",
    "reasonmaxxer_loss",
]


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, clip: float = 2.5) -> Tensor:
    """Per-group normalised advantages: [N] rewards, [N] int group ids -> [N] fp32.

    A_i = (r_i - mean_g r) / (std_g r + eps), population std (divide by G), clipped to
    [-clip, clip]. Groups whose rewards are all equal get exactly 0. Group ids need not
    be contiguous or sorted; the math is done in float64.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    r = rewards.double()  # [N]
    if not torch.isfinite(r).all():
        raise ReasonMaxxerError("group_advantages: rewards contain nan or inf")
    _, inv = torch.unique(group_ids, return_inverse=True)  # inv: [N] in [0, G)
    G = int(inv.max()) + 1 if r.numel() else 0
    cnt = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))  # [G]
    mean = torch.zeros_like(cnt).index_add_(0, inv, r) / cnt  # [G]
    dev = r - mean[inv]  # [N]
    std = (torch.zeros_like(cnt).index_add_(0, inv, dev * dev) / cnt).sqrt()  # [G] population std
    rmax = torch.full_like(cnt, -torch.inf).scatter_reduce_(0, inv, r, "amax")  # [G]
    rmin = torch.full_like(cnt, torch.inf).scatter_reduce_(0, inv, r, "amin")  # [G]
    adv = dev / (std[inv] + eps)  # [N]
    adv = torch.where((rmax == rmin)[inv], torch.zeros_like(adv), adv)
    return adv.clamp(-clip, clip).float()


def masked_sum_and_count(values: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """(sum of values where mask, number of True in mask). values/mask broadcastable, e.g. [B, T].

    Unmasked entries are replaced by 0 before summing, so nan/inf there never leak into
    the sum or its gradient.
    """
    m = mask.bool()
    return torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(), int(m.sum())


def _resolve_denom(denom: float | None, count: int, name: str) -> float:
    if denom is None:
        return float(max(count, 1))  # an empty mask gives a loss of exactly 0
    if float(denom) <= 0:
        raise ValueError(f"{name} must be > 0, got {denom}")
    return float(denom)


def _row_denom(denom: Tensor, B: int, name: str) -> Tensor:
    """Check a per-row denominator: [B], every entry > 0."""
    if denom.shape != (B,):
        raise ValueError(f"{name} as a tensor must be [B]={B}, got {tuple(denom.shape)}")
    if not bool((denom > 0).all()):
        raise ValueError(f"{name} must be > 0 in every row, got {denom.tolist()}")
    return denom


def decision_loss(
    token_logprob: Tensor, advantages: Tensor, gate: Tensor, denom: float | Tensor | None = None
) -> Tensor:
    """-(1/denom) * sum over gated (b, t) of A_b * log p_theta(x_t): scalar.

    token_logprob: [B, T] (differentiable); advantages: [B]; gate: [B, T] bool.
    denom defaults to the number of gated positions here (1 if none: the loss is then 0).
    Under gradient accumulation pass the gated count of the whole optimizer step, so the
    summed loss and its gradient do not depend on how the step is split. A [B] tensor
    denom divides row b's terms by denom[b] (per-sequence normalisation, module docstring).
    """
    if token_logprob.dim() != 2 or gate.shape != token_logprob.shape:
        raise ValueError(
            f"token_logprob and gate must both be [B, T]; got {tuple(token_logprob.shape)} and {tuple(gate.shape)}"
        )
    if advantages.shape != (token_logprob.shape[0],):
        raise ValueError(f"advantages must be [B]={token_logprob.shape[0]}, got {tuple(advantages.shape)}")
    if isinstance(denom, Tensor):
        d = _row_denom(denom, token_logprob.shape[0], "denom").to(token_logprob.device, token_logprob.dtype)
        weighted = (advantages.to(token_logprob.dtype) / d)[:, None] * token_logprob  # [B, T]
        return -masked_sum_and_count(weighted, gate)[0]
    weighted = advantages.to(token_logprob.dtype)[:, None] * token_logprob  # [B, T]
    total, count = masked_sum_and_count(weighted, gate)
    return -total / _resolve_denom(denom, count, "denom")


class _AnchorKL(torch.autograd.Function):
    """sum over selected rows of KL(softmax(base) || softmax(theta)) / denom, chunked; with
    weights [M] (one per selected row), sum of weight * KL / denom instead.

    Backward uses d KL / d theta_logits = softmax(theta) - softmax(base) per row, so no
    [N, V] activation is saved; base gets no gradient.
    """

    @staticmethod
    def forward(ctx, base: Tensor, theta: Tensor, idx: Tensor, denom: float, chunk: int, weights=None) -> Tensor:
        # base, theta: [N, V]; idx: [M] selected rows; weights: [M] fp32 or None
        cdt = torch.promote_types(theta.dtype, torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=theta.device)
        for s in range(0, idx.numel(), chunk):
            rows = idx[s : s + chunk]  # [c]
            lb = base[rows].to(cdt)  # [c, V], fresh copy (advanced indexing)
            lt = theta[rows].to(cdt)  # [c, V], fresh copy
            lb.sub_(torch.logsumexp(lb, -1, keepdim=True)).clamp_(min=torch.finfo(cdt).min)  # log p_base
            lt.sub_(torch.logsumexp(lt, -1, keepdim=True)).clamp_(min=torch.finfo(cdt).min)  # log p_theta
            p = lb.exp()  # [c, V]
            if weights is None:
                total += p.mul_(lb.sub_(lt)).sum().double()  # sum_v p (log p - log q), all rows
            else:
                total += (p.mul_(lb.sub_(lt)).sum(-1) * weights[s : s + chunk].to(cdt)).sum().double()
        ctx.weights = weights
        ctx.save_for_backward(base, theta, idx)
        ctx.denom, ctx.chunk = denom, chunk
        return (total / denom).to(cdt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        base, theta, idx = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[1]:
            cdt = torch.promote_types(theta.dtype, torch.float32)
            scale = grad_out.to(cdt) / ctx.denom
            grad = torch.zeros_like(theta, memory_format=torch.contiguous_format)  # [N, V]
            for s in range(0, idx.numel(), ctx.chunk):
                rows = idx[s : s + ctx.chunk]
                q = torch.softmax(theta[rows].to(cdt), -1)  # [c, V]
                q.sub_(torch.softmax(base[rows].to(cdt), -1)).mul_(scale)  # (q - p) * g / denom
                if ctx.weights is not None:
                    q.mul_(ctx.weights[s : s + ctx.chunk, None].to(cdt))
                grad[rows] = q.to(grad.dtype)
        return None, grad, None, None, None, None


def anchor_kl(
    logits_base: Tensor,
    logits_theta: Tensor,
    mask: Tensor,
    denom: float | Tensor | None = None,
    chunk_size: int = 128,
) -> Tensor:
    """Mean over masked positions of KL(p_base || p_theta), nats: scalar (fp32).

    logits_base, logits_theta: [B, T, V] (any float dtype; math in fp32, full vocabulary,
    no temperature); mask: [B, T] bool. KL = sum_v p_b (log p_b - log p_theta) (forward
    KL, base as the reference). Gradient flows into ``logits_theta`` only. denom defaults
    to the number of masked positions (1 if none); pass the whole step's count under
    gradient accumulation. Forward and backward work on ``chunk_size`` positions at a
    time and save no [B, T, V] activation (the backward writes one gradient of
    logits_theta's size). Non-contiguous inputs are copied by reshape; slice the masks,
    not the logits, where possible. A [B] tensor denom divides row b's KL terms by denom[b]
    (per-sequence normalisation, module docstring).
    """
    if logits_base.shape != logits_theta.shape or logits_theta.dim() != 3:
        raise ValueError(
            f"logits must both be [B, T, V]; got {tuple(logits_base.shape)} and {tuple(logits_theta.shape)}"
        )
    if mask.shape != logits_theta.shape[:2]:
        raise ValueError(f"mask must be [B, T]={tuple(logits_theta.shape[:2])}, got {tuple(mask.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V = logits_theta.shape[-1]
    idx = mask.reshape(-1).bool().nonzero().squeeze(1)  # [M]
    base, theta = logits_base.detach().reshape(-1, V), logits_theta.reshape(-1, V)
    if isinstance(denom, Tensor):
        d = _row_denom(denom, mask.shape[0], "denom").to(idx.device, torch.float32)
        w = 1.0 / d[idx // mask.shape[1]]  # [M] 1 / (the row's denominator)
        return _AnchorKL.apply(base, theta, idx, 1.0, chunk_size, w)
    d = _resolve_denom(denom, idx.numel(), "denom")
    return _AnchorKL.apply(base, theta, idx, d, chunk_size)


@dataclass(frozen=True)
class LossMasks:
    """What a variant feeds `reasonmaxxer_loss` (all in the column-t-is-token-t convention)."""

    advantages: Tensor  # [B] fp32
    decision: Tensor  # [B, T] bool, the gate D
    anchor: Tensor  # [B, T] bool, M
    lam: float


LossVariant = Callable[..., LossMasks]


LOSS_VARIANTS: dict[str, LossVariant] = {}


def register_loss(name: str) -> Callable[[LossVariant], LossVariant]:
    """Decorator: register ``fn(*, gate, completion_mask, attention_mask, advantages, lam, correct) -> LossMasks``
    (correct: [B] bool or None when the caller has no grades)."""

    def deco(fn: LossVariant) -> LossVariant:
        if name in LOSS_VARIANTS:
            raise ValueError(f"loss variant {name!r} is already registered")
        LOSS_VARIANTS[name] = fn
        return fn

    return deco


def _valid_predictions(attention_mask: Tensor) -> Tensor:
    """[B, T] -> [B, T] bool: token t and its predecessor t-1 are both real (column 0 False)."""
    m = attention_mask.bool()
    valid = torch.zeros_like(m)
    valid[:, 1:] = m[:, 1:] & m[:, :-1]
    return valid


@register_loss("reasonmaxxer")
def _reasonmaxxer_masks(*, gate, completion_mask, attention_mask, advantages, lam, correct=None) -> LossMasks:
    valid = _valid_predictions(attention_mask)
    decision = gate.bool() & completion_mask.bool() & valid & (advantages != 0)[:, None]
    return LossMasks(advantages.float(), decision, valid & ~decision, float(lam))


@register_loss("positive_only")
def _positive_only_masks(*, gate, completion_mask, attention_mask, advantages, lam, correct=None) -> LossMasks:
    base = _reasonmaxxer_masks(
        gate=gate, completion_mask=completion_mask, attention_mask=attention_mask, advantages=advantages, lam=lam
    )
    keep = (advantages > 0)[:, None]  # [B, 1]
    adv = torch.where(advantages > 0, advantages, torch.zeros_like(advantages)).float()
    return LossMasks(adv, base.decision & keep, base.anchor & keep, float(lam))


@register_loss("positive_only_paper")
def _positive_only_paper_masks(*, gate, completion_mask, attention_mask, advantages, lam, correct=None) -> LossMasks:
    """OFFICIAL scripts/prepare_training_data.py:218-219 (incorrect rollouts skipped) and :254-255
    (advantage = 1.0 on every kept one); decisions and anchor as ``reasonmaxxer`` on what is left."""
    if correct is None:
        raise ReasonMaxxerError("loss variant 'positive_only_paper' needs each rollout's correct flag (pass correct=)")
    keep = correct.bool().to(advantages.device)  # [B]
    base = _reasonmaxxer_masks(
        gate=gate, completion_mask=completion_mask, attention_mask=attention_mask, advantages=keep.float(), lam=lam
    )
    return LossMasks(keep.float(), base.decision & keep[:, None], base.anchor & keep[:, None], float(lam))


@register_loss("no_anchor")
def _no_anchor_masks(*, gate, completion_mask, attention_mask, advantages, lam, correct=None) -> LossMasks:
    base = _reasonmaxxer_masks(
        gate=gate, completion_mask=completion_mask, attention_mask=attention_mask, advantages=advantages, lam=lam
    )
    return LossMasks(base.advantages, base.decision, torch.zeros_like(base.anchor), 0.0)


@register_loss("all_tokens")
def _all_tokens_masks(*, gate, completion_mask, attention_mask, advantages, lam, correct=None) -> LossMasks:
    valid = _valid_predictions(attention_mask)
    completion = completion_mask.bool() & valid
    return LossMasks(advantages.float(), completion, valid & ~completion_mask.bool(), float(lam))


@register_loss("rft")
def _rft_masks(*, gate, completion_mask, attention_mask, advantages, lam, correct=None) -> LossMasks:
    """Rejection-sampling fine-tune: plain SFT (weight 1) on every completion token of the
    rollouts with A > 0 (the correct ones of a mixed-success group); no gate, no anchor."""
    valid = _valid_predictions(attention_mask)
    keep = (advantages > 0)[:, None]
    decision = completion_mask.bool() & valid & keep
    return LossMasks((advantages > 0).float(), decision, torch.zeros_like(decision), 0.0)


def loss_masks(
    variant: str,
    *,
    gate: Tensor,
    completion_mask: Tensor,
    attention_mask: Tensor,
    advantages: Tensor,
    lam: float = 0.2,
    correct: Tensor | None = None,
) -> LossMasks:
    """Apply the named variant: gate/completion/attention [B, T], advantages [B] (correct [B]
    bool, needed by ``positive_only_paper``) -> `LossMasks`."""
    try:
        fn = LOSS_VARIANTS[variant]
    except KeyError:
        raise ReasonMaxxerError(f"unknown loss variant {variant!r}; choose one of {sorted(LOSS_VARIANTS)}") from None
    for name, x in (("gate", gate), ("completion_mask", completion_mask)):
        if x.shape != attention_mask.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} != attention_mask shape {tuple(attention_mask.shape)}")
    if advantages.shape != (attention_mask.shape[0],):
        raise ValueError(f"advantages must be [B]={attention_mask.shape[0]}, got {tuple(advantages.shape)}")
    return fn(
        gate=gate,
        completion_mask=completion_mask,
        attention_mask=attention_mask,
        advantages=advantages,
        lam=lam,
        correct=correct,
    )


DIAGNOSTICS = ("dlogp_pos_sum", "dlogp_pos_tokens", "dlogp_neg_sum", "dlogp_neg_tokens", "pos_pressure", "neg_pressure")


def decision_diagnostics(token_logprob: Tensor, advantages: Tensor, base_token_logprob: Tensor | None) -> dict:
    """The official per-step decision diagnostics, as sums over the given decision positions.

    token_logprob [K]: log p_theta(x_t) at K decision positions; advantages [K]: their rows' A;
    base_token_logprob [K] or None: log p_base(x_t) there (None: the Delta-logp sums are 0 over 0
    tokens). Returns floats/ints: "dlogp_pos_sum" = sum over A > 0 of log p_theta - log p_base,
    "dlogp_pos_tokens" their count, the same for A < 0 ("dlogp_neg_*"); "pos_pressure" = sum
    over A > 0 of A * (-log p_theta), "neg_pressure" = sum over A < 0 of |A| * (-log p_theta).
    OFFICIAL scripts/train_reasonmaxxer.py:1018-1020 (delta_logp = student - base log-prob of the
    taken token), :1148-1151 (Delta-logp+/- = its mean over A > 0 / A < 0 decision tokens),
    :1134-1141 (pos/neg pressure sums), :1153 (neg_pos_pressure_ratio = neg / pos). Divide the
    step's sums by the step's counts for the means. No gradient.
    """
    with torch.no_grad():
        lp, a = token_logprob.detach().float(), advantages.detach().float()
        pos, neg = a > 0, a < 0
        zero = torch.zeros((), dtype=torch.float32, device=lp.device)
        vals = [torch.where(pos, a * -lp, zero).sum(), torch.where(neg, -a * -lp, zero).sum()]
        have_base = base_token_logprob is not None
        if have_base:
            d = lp - base_token_logprob.detach().float()
            vals += [torch.where(pos, d, zero).sum(), torch.where(neg, d, zero).sum()]
        out = torch.stack(vals).double().tolist()  # one device sync
    return {
        "dlogp_pos_sum": out[2] if have_base else 0.0,
        "dlogp_pos_tokens": int(pos.sum()) if have_base else 0,
        "dlogp_neg_sum": out[3] if have_base else 0.0,
        "dlogp_neg_tokens": int(neg.sum()) if have_base else 0,
        "pos_pressure": out[0],
        "neg_pressure": out[1],
    }


def diagnostics_summary(agg: dict) -> dict:
    """metrics.jsonl's decision diagnostics from a step's summed `decision_diagnostics` (agg: those keys):
    dlogp_pos / dlogp_neg (mean log p_theta - log p_base of the taken token over the step's gated
    tokens of rollouts with A > 0 / A < 0, nats; None without them or without base log-probs),
    pos_pressure / neg_pressure (sums of |A| * -log p_theta there) and pressure_ratio = neg / pos
    (the official Delta-logp+/-, pos/neg_pressure_sum and neg_pos_pressure_ratio, OFFICIAL
    scripts/train_reasonmaxxer.py:1134-1153; it logs them per micro-batch and, per checkpoint
    window, decision_pressure = sum neg / sum pos, :895-911)."""

    def mean(key):
        n = agg[f"{key}_tokens"]
        return round(agg[f"{key}_sum"] / n, 6) if n else None

    pos, neg = agg["pos_pressure"], agg["neg_pressure"]
    return {
        "dlogp_pos": mean("dlogp_pos"),
        "dlogp_neg": mean("dlogp_neg"),
        "pos_pressure": round(pos, 6),
        "neg_pressure": round(neg, 6),
        "pressure_ratio": round(neg / pos, 6) if pos else None,
    }


def reasonmaxxer_loss(
    *,
    token_logprob: Tensor,
    logits_theta: Tensor,
    logits_base: Tensor,
    advantages: Tensor,
    gate: Tensor,
    anchor_mask: Tensor,
    lam: float = 0.2,
    dec_denom: float | Tensor | None = None,
    anc_denom: float | Tensor | None = None,
    chunk_size: int = 128,
    base_token_logprob: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """total = decision_loss + lam * anchor_kl, each averaged over its own mask.

    token_logprob: [B, T] log p_theta of each token (`scoring.token_logprobs` of
    logits_theta); logits_theta, logits_base: [B, T, V]; advantages: [B]; gate,
    anchor_mask: [B, T] bool (normally from `loss_masks`; the anchor mask is every valid
    non-gated position, prompt included). dec_denom/anc_denom: the whole optimizer step's
    counts under gradient accumulation (default: this batch's counts), or [B] per-row
    denominators (per-sequence normalisation). With lam == 0 the anchor is not computed
    (reported as 0 over 0 tokens). base_token_logprob [B, T]: log p_base of each token (read at
    gated positions only) for the Delta-logp diagnostics (None: not reported).
    Returns (loss scalar, {"loss", "decision", "anchor", "gated_tokens", "anchor_tokens"} and
    the `decision_diagnostics` keys); with global denominators "decision"/"anchor" are this
    micro-batch's share, so they sum over the step's micro-batches to the step's values.
    """
    dec = decision_loss(token_logprob, advantages, gate, dec_denom)
    if lam != 0:
        anc = anchor_kl(logits_base, logits_theta, anchor_mask, anc_denom, chunk_size)
        n_anchor = int(anchor_mask.bool().sum())
    else:
        anc, n_anchor = torch.zeros((), dtype=dec.dtype, device=dec.device), 0
    loss = dec + lam * anc
    stats = {
        "loss": float(loss.detach()),
        "decision": float(dec.detach()),
        "anchor": float(anc.detach()),
        "gated_tokens": int(gate.bool().sum()),
        "anchor_tokens": n_anchor,
    }
    g = gate.bool()
    adv = advantages[:, None].expand(g.shape)[g]
    blp = None if base_token_logprob is None else base_token_logprob[g]
    stats.update(decision_diagnostics(token_logprob[g], adv, blp))
    return loss, stats
