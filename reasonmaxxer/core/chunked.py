"""ReasonMaxxer's loss straight from final hidden states, one chunk of positions at a time.

Today's loop builds [B, T, V] logits (theta and base), then `reasonmaxxer_loss` on them. At
V = 151,936 (Qwen) that is 0.6 MB of fp32 per position and per copy; this module never holds
more than one [chunk, V] block of logits (plus a few scratch buffers of that size) in forward
or backward: the backward recomputes each chunk's logits from the saved hidden states.

    loss = sum_i dec_weight_i * log p_theta(targets_i | i)                    (decision)
         + sum_i anc_weight_i * KL(p_base(.|i) || p_theta(.|i))                (anchor)
         + sum_i ent_weight_i * H(p_theta(.|i))                                (optional)

with p_theta = softmax(hidden @ weight.T + bias), p_base = softmax(hidden_base @ weight_base.T
+ bias_base) (weight_base defaults to weight: a LoRA run's frozen head). With
dec_weight = -A_b / dec_denom at gated positions and anc_weight = lam / anc_denom at anchored
ones (`head_loss_weights`), this is `decision_loss + lam * anchor_kl` of `core.losses`.

Gradient w.r.t. the logits of row i (q = p_theta, p = p_base, y = target):
    dec_i * (onehot(y) - q) + anc_i * (q - p) - ent_i * q * (log q + H(q))
then grad_hidden = G @ W, grad_weight = G^T @ h (summed over chunks), grad_bias = G.sum(0).
All math is fp32 (fp64 for the running sums) whatever the input dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .losses import decision_diagnostics

__all__ = ["chunked_head_loss", "head_loss_weights"]

# stats slots, in the order of the float64 vector the autograd function returns
_STATS = ("decision", "anchor_loss", "anchor_kl_sum", "entropy_loss", "entropy_sum")


def head_loss_weights(
    advantages: Tensor,
    gate: Tensor,
    anchor_mask: Tensor,
    lam: float,
    dec_denom: float | Tensor,
    anc_denom: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The rows that matter and their coefficients, from `reasonmaxxer_loss`'s inputs.

    advantages [B]; gate, anchor_mask [B, T] bool (same columns as the hidden states passed
    later); dec_denom, anc_denom > 0 (the step's counts), or [B] tensors of per-row
    denominators (per-sequence normalisation: row b's weights use denom[b]). Returns
    (positions [N] int64 into the flattened [B*T], dec_weight [N] fp32 = -A_b/dec_denom where
    gated else 0, anc_weight [N] fp32 = lam/anc_denom where anchored else 0); positions are
    the rows where gate | anchor_mask, in row-major order.
    """
    if gate.shape != anchor_mask.shape or gate.dim() != 2 or advantages.shape != gate.shape[:1]:
        raise ValueError(
            f"need advantages [B], gate and anchor_mask [B, T]; got {tuple(advantages.shape)}, "
            f"{tuple(gate.shape)}, {tuple(anchor_mask.shape)}"
        )
    g, a = gate.bool(), anchor_mask.bool()
    pos = (g | a).reshape(-1).nonzero().squeeze(1)  # [N]
    adv = advantages.float()[:, None].expand(gate.shape).reshape(-1)[pos]  # [N]
    zero = torch.zeros((), dtype=torch.float32, device=adv.device)
    if isinstance(dec_denom, Tensor) or isinstance(anc_denom, Tensor):
        if not (isinstance(dec_denom, Tensor) and isinstance(anc_denom, Tensor)):
            raise ValueError("dec_denom and anc_denom must both be floats or both be [B] tensors")
        for d in (dec_denom, anc_denom):
            if d.shape != advantages.shape or not bool((d > 0).all()):
                raise ValueError(f"per-row denominators must be [B] and > 0, got {d.tolist()}")
        row = pos // gate.shape[1]  # [N] the row of each position
        dd, ad = dec_denom.to(adv.device, torch.float32)[row], anc_denom.to(adv.device, torch.float32)[row]
        dec = torch.where(g.reshape(-1)[pos], -adv / dd, zero)
        anc = torch.where(a.reshape(-1)[pos], float(lam) / ad, zero) if lam else torch.zeros_like(adv)
        return pos, dec, anc
    if float(dec_denom) <= 0 or float(anc_denom) <= 0:
        raise ValueError(f"dec_denom and anc_denom must be > 0, got {dec_denom} and {anc_denom}")
    dec = torch.where(g.reshape(-1)[pos], -adv / float(dec_denom), zero)
    anc = torch.where(a.reshape(-1)[pos], zero + float(lam) / float(anc_denom), zero) if lam else torch.zeros_like(adv)
    return pos, dec, anc


def _logits(h: Tensor, w32: Tensor, b: Tensor | None) -> Tensor:
    """[c, H] (any float) @ [V, H] fp32 (+ [V]) -> fresh [c, V] fp32 logits."""
    h = h.float()
    return torch.mm(h, w32.t()) if b is None else torch.addmm(b.float(), h, w32.t())


def _active_chunks(w: Tensor | None, chunk: int) -> frozenset[int]:
    """Indices of the chunks holding a nonzero entry of w [N] (one device sync)."""
    if w is None:
        return frozenset()
    return frozenset((w.nonzero().squeeze(1) // chunk).unique().tolist())


def _no_autocast(fn):
    """Run an autograd Function's forward/backward with autocast off: its matmuls must stay fp32
    (under an enclosing bf16 autocast, e.g. a full fine-tune's, torch.mm would run in bf16)."""

    @functools.wraps(fn)
    def wrapped(ctx, *args):
        dev = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(dev, enabled=False):
            return fn(ctx, *args)

    return wrapped


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, bias, hidden_base, weight_base, bias_base, targets, dec, anc, ent, chunk, active):
        anc_on, ent_on, diag_on = active  # chunk indices with a nonzero anc / ent weight, or diagnostics rows
        N = hidden.shape[0]
        w32 = weight.detach().float()  # [V, H]; a copy only if weight is not fp32
        wb32 = w32 if weight_base is None else weight_base.detach().float()
        bb = bias if weight_base is None else bias_base
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)  # [N] logsumexp of theta
        lse_b = torch.zeros_like(lse)  # [N] of base (anchored chunks only)
        ent_val = torch.zeros_like(lse)  # [N] H(p_theta) (chunks with an entropy weight only)
        tlp = torch.empty_like(lse)  # [N] log p_theta(target)
        blp = torch.full_like(lse, float("nan"))  # [N] log p_base(target) (chunks with base logits only)
        fmin = torch.finfo(torch.float32).min
        for k, s in enumerate(range(0, N, chunk)):
            e = min(s + chunk, N)
            lq = _logits(hidden[s:e], w32, bias)  # [c, V]
            lse[s:e] = torch.logsumexp(lq, -1)
            tlp[s:e] = lq.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
            stats[0] += (dec[s:e] * tlp[s:e]).sum().double()
            if k not in anc_on and k not in ent_on and k not in diag_on:
                continue
            lq.sub_(lse[s:e, None]).clamp_(min=fmin)  # log q
            if k in ent_on:
                w = ent[s:e]
                h = -(lq.exp().mul_(lq)).sum(-1)  # [c] H(q)
                ent_val[s:e] = h
                stats[3] += (w * h).sum().double()
                stats[4] += torch.where(w != 0, h, torch.zeros_like(h)).sum().double()
            if k in anc_on or k in diag_on:
                lp = _logits(hidden_base[s:e], wb32, bb)  # [c, V]
                lse_b[s:e] = torch.logsumexp(lp, -1)
                lp.sub_(lse_b[s:e, None]).clamp_(min=fmin)  # log p
                blp[s:e] = lp.gather(1, targets[s:e, None]).squeeze(1)
            if k in anc_on:
                a = anc[s:e]
                kl = lp.exp().mul_(lp.sub_(lq)).sum(-1)  # [c] sum_v p (log p - log q), as anchor_kl
                stats[1] += (a * kl).sum().double()
                stats[2] += torch.where(a != 0, kl, torch.zeros_like(kl)).sum().double()
        ctx.save_for_backward(hidden, weight, bias, hidden_base, weight_base, bias_base, targets, dec, anc, ent)
        ctx.small = (lse, lse_b, ent_val)
        ctx.chunk, ctx.active = chunk, active
        ctx.mark_non_differentiable(stats, tlp, blp)
        loss = (stats[0] + stats[1] + stats[3]).float()
        return loss, stats, tlp, blp

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_no_autocast
    def backward(ctx, grad_loss, _grad_stats, _grad_tlp, _grad_blp):
        hidden, weight, bias, hidden_base, weight_base, bias_base, targets, dec, anc, ent = ctx.saved_tensors
        lse, lse_b, ent_val = ctx.small
        anc_on, ent_on, _ = ctx.active
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_loss.float()
        dec, anc = dec * g, anc * g  # fold d(outer)/d(loss) into the coefficients, [N]
        ent = None if ent is None else ent * g
        w32 = weight.detach().float()
        wb32 = w32 if weight_base is None else weight_base.detach().float()
        bb = bias if weight_base is None else bias_base
        gh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None  # [N, H]
        gw = torch.zeros_like(w32) if need_w else None  # [V, H] fp32
        gb = torch.zeros(w32.shape[0], dtype=torch.float32, device=w32.device) if need_b else None  # [V]
        for k, s in enumerate(range(0, hidden.shape[0], ctx.chunk)):
            e = min(s + ctx.chunk, hidden.shape[0])
            lq = _logits(hidden[s:e], w32, bias).sub_(lse[s:e, None])  # log q, [c, V]
            d, a = dec[s:e, None], anc[s:e, None]
            if k in ent_on:  # d H / d z = -q (log q + H)
                G = lq.exp()  # q
                lq.clamp_(min=torch.finfo(torch.float32).min).add_(ent_val[s:e, None]).mul_(G).mul_(
                    ent[s:e, None]
                )  # ent q (log q + H)
                G.mul_(a - d).sub_(lq)
            else:
                G = lq.exp_().mul_(a - d)  # (anc - dec) q, in place
            del lq
            G.scatter_add_(1, targets[s:e, None], d)  # + dec onehot(y)
            if k in anc_on:
                p = _logits(hidden_base[s:e], wb32, bb).sub_(lse_b[s:e, None]).exp_()  # [c, V]
                G.addcmul_(p, a, value=-1.0)  # - anc p
                del p
            if need_h:
                gh[s:e] = torch.mm(G, w32)  # [c, H]
            if need_w:
                gw.addmm_(G.t(), hidden[s:e].float())  # [V, H]
            if need_b:
                gb += G.sum(0)
        return (
            None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            *([None] * 9),
        )


def _check_shapes(
    hidden, hidden_base, weight, bias, weight_base, bias_base, targets, dec_weight, anc_weight, ent_weight
):
    """Raise ValueError unless `chunked_head_loss`'s inputs have their documented shapes:
    hidden [N, H], weight [V, H]; targets and the weights [N]; hidden_base, weight_base as
    hidden, weight; bias, bias_base [V] (the optional ones may be None)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, V = hidden.shape[0], weight.shape[0]
    for name, x in (
        ("targets", targets),
        ("dec_weight", dec_weight),
        ("anc_weight", anc_weight),
        ("ent_weight", ent_weight),
    ):
        if x is not None and x.shape != (N,):
            raise ValueError(f"{name} must be [N]={N}, got {tuple(x.shape)}")
    for name, x, shape in (
        ("hidden_base", hidden_base, hidden.shape),
        ("weight_base", weight_base, weight.shape),
        ("bias", bias, (V,)),
        ("bias_base", bias_base, (V,)),
    ):
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} must be {tuple(shape)}, got {tuple(x.shape)}")


def chunked_head_loss(
    hidden: Tensor,
    hidden_base: Tensor | None,
    weight: Tensor,
    targets: Tensor,
    dec_weight: Tensor,
    anc_weight: Tensor,
    *,
    bias: Tensor | None = None,
    weight_base: Tensor | None = None,
    bias_base: Tensor | None = None,
    ent_weight: Tensor | None = None,
    adv_rows: Tensor | None = None,
    chunk: int = 1024,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted decision + anchor (+ entropy) loss of N positions from their hidden states.

    hidden [N, H] (differentiable; the output head's input at the positions that matter);
    hidden_base [N, H] the base model's at the same positions (no gradient; None when
    anc_weight is all 0); weight [V, H], bias [V] or None: the trained output head (they get
    the right gradient when they require one, e.g. a tied embedding); weight_base/bias_base:
    the base model's head (default: weight and bias, detached: a LoRA run; bias_base is read
    only with weight_base, None meaning no bias). targets [N] int64;
    dec_weight, anc_weight, ent_weight [N] (constants, e.g. from `head_loss_weights`).

    loss = sum dec_i log q_i(y_i) + sum anc_i KL(p_i || q_i) + sum ent_i H(q_i), a 0-dim fp32
    tensor. Stats (plain floats, detached): "loss"; "decision" (the first sum: what
    `reasonmaxxer_loss` reports as "decision"); "anchor_loss" (the second sum, = lam *
    "anchor"); "anchor_kl_sum" (sum of KL over rows with anc_i != 0: divide by the step's
    anc_denom for `reasonmaxxer_loss`'s "anchor"); "entropy_loss", "entropy_sum" (0 without
    ent_weight). adv_rows [N] (optional): each decision row's advantage A (0 on other rows):
    the stats then also hold `core.losses.decision_diagnostics` over the rows with A != 0
    (log p_base(y) from the base logits of their chunks, when hidden_base is given: a chunk
    with such a row and no anchored row computes its base logits for that). Peak memory:
    about four [chunk, V] fp32 buffers, plus fp32 copies of the [V, H] head (and its [V, H]
    fp32 gradient when it requires one), plus [N, H] fp32 grads.
    """
    _check_shapes(
        hidden, hidden_base, weight, bias, weight_base, bias_base, targets, dec_weight, anc_weight, ent_weight
    )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    N = hidden.shape[0]
    anc = anc_weight.detach().float()
    anc_on = _active_chunks(anc, chunk)
    if hidden_base is None and anc_on:
        raise ValueError("hidden_base is None but anc_weight has nonzero entries")
    ent = None if ent_weight is None else ent_weight.detach().float()
    if adv_rows is not None and adv_rows.shape != (N,):
        raise ValueError(f"adv_rows must be [N]={N}, got {tuple(adv_rows.shape)}")
    diag_on = _active_chunks(adv_rows, chunk) if adv_rows is not None and hidden_base is not None else frozenset()
    loss, stats, tlp, blp = _ChunkedHeadLoss.apply(
        hidden,
        weight,
        bias,
        None if hidden_base is None else hidden_base.detach(),
        None if weight_base is None else weight_base.detach(),
        None if bias_base is None else bias_base.detach(),
        targets.long(),
        dec_weight.detach().float(),
        anc,
        ent,
        int(chunk),
        (anc_on, _active_chunks(ent, chunk), diag_on),
    )
    out = dict(zip(_STATS, stats.tolist()))  # one device sync
    out = {"loss": out["decision"] + out["anchor_loss"] + out["entropy_loss"], **out}
    if adv_rows is not None:
        sel = adv_rows != 0
        out.update(decision_diagnostics(tlp[sel], adv_rows[sel], None if hidden_base is None else blp[sel]))
    return loss, out
