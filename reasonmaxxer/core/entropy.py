"""core.entropy."""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(x: Tensor) -> Tensor:
    """[..., V] -> [N, V] (a view when the layout allows it, else a copy)."""
    return x.reshape(-1, x.shape[-1])


def entropy_logprob_inplace(
    logits: Tensor, tokens: Tensor | None, work: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Entropy and token log-prob of each row of an fp32 [c, V] block, OVERWRITING it.

    logits: [c, V] fp32, owned by the caller and clobbered (reused as logits - max).
    tokens: [c] int64 or None. work: None or an fp32 [c, V] scratch buffer to reuse (saves
    allocating and page-faulting a fresh one per chunk, ~half the cost of the exp on CPU).
    Returns (entropy [c] fp32 nats, logprob [c] fp32 or None). Peak extra memory: one more
    [c, V] fp32 buffer. One exp pass: with x = logits - max, e = exp(x), Z = sum e,
    H = log Z - sum(e * x) / Z (both terms >= 0, no cancellation) and
    log p(token) = x[token] - log Z, the same arithmetic as ``log_softmax``.
    """
    x = logits.sub_(logits.amax(-1, keepdim=True))  # [c, V] logits - max, <= 0
    e = x.exp() if work is None else torch.exp(x, out=work)  # [c, V]
    z = e.sum(-1)  # [c] >= 1
    logprob_num = None if tokens is None else x.gather(-1, tokens[:, None]).squeeze(-1)  # [c]
    # sum_v e*x in place (no third buffer). Not bmm/einsum: on CPU their fp32 row-dot over
    # V = 49k entries was measured ~3e-4 relative off, this ~4e-7.
    ex = e.mul_(x).sum(-1)  # [c]
    bad = ex.isnan()  # rows with -inf logits (masked vocabulary): 0 * -inf = nan, should be 0
    if bad.any():
        rows = bad.nonzero().squeeze(1)
        ex[rows] = e[rows].nan_to_num_(nan=0.0).sum(-1)
    log_z = z.log()  # [c]
    entropy = log_z - ex / z  # [c] nats
    logprob = None if logprob_num is None else logprob_num - log_z  # [c]
    return entropy, logprob


@torch.no_grad()
def entropy_and_logprob(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy and token log-prob of each row: logits [B, V] (any float dtype, untempered),
    tokens [B] int64 -> (entropy [B] fp32 nats, log p(token) [B] fp32). Used by the sampler.

    -inf logits (a masked vocabulary) count as probability 0 (0 * log 0 = 0), not NaN.
    The arithmetic is ``log_softmax`` then -sum(p * log p), kept bit-identical to the
    sampler's original so sampled entropies (reused for the demo's gating) do not move; it
    differs from ``entropy_logprob_inplace`` by ~1e-6 relative at V = 49k (that one is the
    more accurate, ~1e-7 vs ~1e-6 relative to fp64).
    """
    logp = torch.log_softmax(logits.float(), -1)  # [B, V]
    ent = -(logp.exp() * logp).nan_to_num_(nan=0.0).sum(-1)  # [B]; only 0 * -inf entries are NaN
    return ent, logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def token_entropy(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Full-vocabulary entropy of softmax(logits), in nats: [..., V] -> [...] fp32.

    Untempered (the raw logits define the distribution). Computed in fp32, ``chunk_size``
    rows of the flattened leading dims at a time, so peak extra memory is about
    2 * chunk_size * V * 4 bytes whatever the input dtype. The input is never modified.
    The result is detached: entropy is a measurement here, not a loss term.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = _rows(logits)  # [N, V]
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)  # [N]
    for s in range(0, rows.shape[0], chunk_size):
        block = rows[s : s + chunk_size].to(torch.float32, copy=True)  # [c, V], our copy
        out[s : s + chunk_size], _ = entropy_logprob_inplace(block, None)
    return out.reshape(logits.shape[:-1])


class _TokenLogprob(torch.autograd.Function):
    """log softmax(logits)[token] per row, chunked in both directions.

    Backward uses the closed form d/dlogits = g * (onehot(token) - softmax(logits)), so
    nothing [N, V]-sized is saved for backward beyond the input itself.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, tokens: Tensor, chunk_size: int) -> Tensor:  # [N,V],[N] -> [N]
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)  # [N]
        for s in range(0, rows.shape[0], chunk_size):
            block = rows[s : s + chunk_size].float()  # [c, V] (not modified)
            tok = tokens[s : s + chunk_size, None]  # [c, 1]
            out[s : s + chunk_size] = block.gather(-1, tok).squeeze(-1) - torch.logsumexp(block, -1)
        ctx.save_for_backward(rows, tokens)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # [N] -> [N, V]
        rows, tokens = ctx.saved_tensors
        grad = torch.empty_like(rows, memory_format=torch.contiguous_format)  # [N, V]
        for s in range(0, rows.shape[0], ctx.chunk_size):
            g = grad_out[s : s + ctx.chunk_size, None].float()  # [c, 1]
            q = torch.softmax(rows[s : s + ctx.chunk_size].float(), dim=-1)  # [c, V]
            q.mul_(-g).scatter_add_(-1, tokens[s : s + ctx.chunk_size, None], g)  # g*(onehot - q)
            grad[s : s + ctx.chunk_size] = q
        return grad, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_size: int = 128) -> Tensor:
    """log p(token) under softmax(logits): logits [..., V], tokens [...] int64 -> [...] fp32.

    Differentiable with respect to ``logits`` (used for the decision term's
    log p_theta). fp32 math, chunked over the flattened leading dims; backward is chunked
    too and saves no [N, V] activations. ``tokens`` must be valid ids in [0, V): mask
    padding afterwards rather than passing -100.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != logits leading shape {tuple(logits.shape[:-1])}")
    flat = _TokenLogprob.apply(_rows(logits), tokens.reshape(-1).long(), chunk_size)  # [N]
    return flat.reshape(tokens.shape)
