"""Teacher-forced scoring: per-token entropy and log-probability under a (frozen) model.

ReasonMaxxer's gate needs, for every position of every stored rollout, the base model's
full-vocabulary entropy H_t = -sum_v p(v) log p(v) (nats, raw logits, no temperature) and
the log-probability of the token that was actually sampled. Both come from one
teacher-forced forward pass (method.md section 3, "Scoring").

The naive way (``model(ids).logits.float().log_softmax(-1)``) materialises fp32 [B, T, V]
logits: 400 MB for one 2048-token SmolLM2 sequence, 1.2 GB for Qwen's 151k vocabulary, and
a few more such buffers for the softmax and the entropy product. `score_sequences` instead
runs the decoder body once (hidden states [B, T, H]) and applies the output head to
``chunk_tokens`` positions at a time, so peak extra memory is O(chunk_tokens * V).

Conventions:

- Column t of the returned [B, T] tensors describes the distribution that *predicts*
  token t, i.e. the logits at position t-1. Column 0, padding, and (for left padding)
  the first real token of each row have no in-sequence predecessor and are 0.
- The sampled token's log-probability is called ``logprob`` (its surprisal is -logprob);
  ``entropy`` is always the full-vocabulary entropy.

Limitations: the output head is applied as ``model.get_output_embeddings()`` followed by
the logit post-processing that Hugging Face models declare in their config
(``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere), ``logits_scaling``
(Granite)). Any other post-processing would make these scores silently wrong, so the first
call for each model compares the chunked path against ``model(...).logits`` on a short
probe and raises `ReasonMaxxerError` on a mismatch. Dropout is not disabled here: call
``model.eval()`` first.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import ReasonMaxxerError

__all__ = ["SequenceScores", "token_entropy", "token_logprobs", "score_sequences", "position_ids_from_mask"]


# --------------------------------------------------------------------------------------
# Per-row statistics of a [N, V] logits block
# --------------------------------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    """[..., V] -> [N, V] (a view when the layout allows it, else a copy)."""
    return x.reshape(-1, x.shape[-1])


def _entropy_logprob_(
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
        out[s : s + chunk_size], _ = _entropy_logprob_(block, None)
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


# --------------------------------------------------------------------------------------
# Sequence scoring with a Hugging Face causal LM
# --------------------------------------------------------------------------------------


class SequenceScores(NamedTuple):
    """Output of `score_sequences`; unpacks as ``entropy, logprob = ...``."""

    entropy: Tensor  # [B, T] fp32 nats, of the distribution predicting token t
    logprob: Tensor  # [B, T] fp32, log p(token t | tokens < t)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, T] 0/1 -> [B, T] int64 positions counting real tokens from 0 (left or right padding).

    Padding positions get a clamped, meaningless position; they are never attended.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _decoder_and_head(model):
    """(decoder body returning hidden states, output head module) of a causal LM / PeftModel."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if head is None or decoder is None or decoder is model:
        raise ReasonMaxxerError(
            f"score_sequences: cannot split {type(model).__name__} into a decoder body and an output head "
            "(needs get_decoder()/.model and get_output_embeddings()); score it with "
            "token_entropy(model(...).logits) instead"
        )
    return decoder, head


def _logit_postprocess(model):
    """The elementwise logits transform the model applies after its head, from its config."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * logit_scale
    div = getattr(cfg, "logits_scaling", None)  # Granite: logits / logits_scaling

    if cap is None and scale is None and div is None:
        return None

    def post(logits: Tensor) -> Tensor:  # [c, V] model dtype -> same
        if scale is not None:
            logits = logits * scale
        if div is not None:
            logits = logits / div
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument
        return torch.is_autocast_enabled()


def _apply_head(head, post, h: Tensor, out: Tensor) -> Tensor:
    """fp32 logits of hidden states h [c, H] written into out [c, V] (a reused buffer).

    A plain bias-free fp32 nn.Linear head (the usual tied embedding) is computed straight
    into ``out``; any other head (LoRA on lm_head, bf16 weights, a bias) runs as a module
    and is copied (cast) in. ``post`` is the config-declared logit transform, or None.
    """
    plain = type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == out.dtype == h.dtype
    if plain and not _autocast_on(h.device.type):
        torch.matmul(h, head.weight.t(), out=out)
        if post is not None:
            out.copy_(post(out))
        return out
    logits = head(h)  # [c, V] model dtype
    return out.copy_(logits if post is None else post(logits))


def _hidden_states(decoder, input_ids, attention_mask, position_ids) -> Tensor:
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden  # [B, T, H]


_CHECKED: "weakref.WeakSet" = weakref.WeakSet()


def _check_head_matches(model, decoder, head, post, input_ids: Tensor) -> None:
    """Once per model: chunked head == model(...).logits on a short probe, else raise."""
    try:
        if model in _CHECKED:
            return
    except TypeError:  # not weak-referenceable: check every call (cheap)
        pass
    probe = input_ids[:1, -8:]  # [1, k]
    mask = torch.ones_like(probe)
    pos = position_ids_from_mask(mask)
    ref = model(input_ids=probe, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()  # [1,k,V]
    hidden = _hidden_states(decoder, probe, mask, pos)[0]  # [k, H]
    ours = _apply_head(head, post, hidden, torch.empty(hidden.shape[0], ref.shape[-1], device=ref.device))[None]
    if ref.shape != ours.shape or not torch.allclose(ref, ours, rtol=1e-3, atol=1e-3 * (1 + ref.abs().max().item())):
        raise ReasonMaxxerError(
            f"score_sequences: {type(model).__name__} post-processes its logits in a way this scorer does not "
            "reproduce (only final_logit_softcapping, logit_scale and logits_scaling are supported); "
            "score it with token_entropy(model(...).logits) instead"
        )
    try:
        _CHECKED.add(model)
    except TypeError:
        pass


@torch.no_grad()
def score_sequences(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    chunk_tokens: int = 256,
    position_ids: Tensor | None = None,
) -> SequenceScores:
    """Teacher-forced (entropy, logprob) of every token of every row, under ``model``.

    input_ids, attention_mask: [B, T] (left or right padded; mask 1 = real token).
    position_ids: [B, T] or None (then derived from the mask, so a left-padded row scores
    exactly like the same row unpadded).
    Returns `SequenceScores` (entropy [B, T], logprob [B, T]), fp32, where column t is
    the distribution predicting token t (logits at t-1): entropy in nats over the full
    vocabulary, logprob = log p(input_ids[:, t]). Positions t with no real predecessor
    (t = 0, padding, a left-padded row's first real token) are 0.

    Memory: the decoder body runs once ([B, T, H] hidden states); the head is applied to
    ``chunk_tokens`` valid positions at a time, so the fp32 [B, T, V] logits never exist
    (peak extra ~ 2 * chunk_tokens * V * 4 bytes on top of the forward pass).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids and attention_mask must both be [B, T]; "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, T = input_ids.shape
    mask = attention_mask.bool()  # [B, T]
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)  # [B, T]

    decoder, head = _decoder_and_head(model)
    post = _logit_postprocess(model)
    _check_head_matches(model, decoder, head, post, input_ids)

    hidden = _hidden_states(decoder, input_ids, attention_mask, position_ids)  # [B, T, H]
    entropy = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)  # [B, T]
    logprob = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)  # [B, T]
    if T < 2:
        return SequenceScores(entropy, logprob)

    valid = mask[:, 1:] & mask[:, :-1]  # [B, T-1]: column t+1 has a real predecessor at t
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # [N] each; predecessor is (b, t), target (b, t+1)
    ent_flat = torch.empty(b_idx.numel(), dtype=torch.float32, device=input_ids.device)  # [N]
    lp_flat = torch.empty_like(ent_flat)  # [N]
    V = head.weight.shape[0] if hasattr(head, "weight") else None
    c_max = min(chunk_tokens, b_idx.numel())
    buf_logits = buf_work = None  # [c_max, V] fp32 each, reused by every chunk
    for s in range(0, b_idx.numel(), chunk_tokens):
        b, t = b_idx[s : s + chunk_tokens], t_idx[s : s + chunk_tokens]  # [c]
        c = b.numel()
        if buf_logits is None:
            V = V if V is not None else head(hidden[b[:1], t[:1]]).shape[-1]
            buf_logits = torch.empty(c_max, V, dtype=torch.float32, device=hidden.device)
            buf_work = torch.empty_like(buf_logits)
        block = _apply_head(head, post, hidden[b, t], buf_logits[:c])  # [c, V] fp32
        ent_flat[s : s + c], lp_flat[s : s + c] = _entropy_logprob_(block, input_ids[b, t + 1], buf_work[:c])
    entropy[:, 1:][valid] = ent_flat
    logprob[:, 1:][valid] = lp_flat
    return SequenceScores(entropy, logprob)
