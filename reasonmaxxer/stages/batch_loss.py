"""One micro-batch's forward and ReasonMaxxer loss (used by `stages.train`, `analysis`).

Two implementations of the same loss, chosen per micro-batch by `TrainConfig.loss_impl`:

- from logits: the model's [B, T, V] logits (trained and base), then `core.losses`;
- chunked (`core.chunked`): the final hidden states of the positions that matter and the
  output head, at most one [chunk, V] block of logits at a time (recomputed in backward).
  At B = 8, T = 8192, V = 151,936 one fp32 logits tensor is 40 GB: this is the path for
  real reasoning lengths. Equal to the logits path to float rounding (tested).

Both encode a prefix shared by every row (few-shot examples) once (`split_prefix`).
"""

from __future__ import annotations

import torch

from ..core.chunked import chunked_head_loss, head_loss_weights
from ..core.entropy import token_logprobs
from ..core.losses import DIAGNOSTICS, anchor_kl, reasonmaxxer_loss
from ..models import cache_kwarg, inner_model, logit_postprocess, split_decoder_head, unwrap_parallel


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


def final_hidden(model, **kw) -> tuple[torch.Tensor, object]:
    """(final hidden states [B, T, H] (after the last norm: the output head's input), the model
    output) of one forward through `model` (a DDP/FSDP wrapper, a PEFT model or a plain LM),
    the head applied to no position (``logits_to_keep`` = an empty index tensor). The hidden
    states come from a forward hook on the decoder body, so the forward still goes through
    the wrappers (DDP's gradient hooks, PEFT's adapters)."""
    inner = inner_model(model)
    decoder, _ = split_decoder_head(inner)
    got = {}

    def hook(module, args, out):
        got["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = decoder.register_forward_hook(hook)
    try:
        out = model(logits_to_keep=torch.zeros(0, dtype=torch.long, device=kw["input_ids"].device), **kw)
    finally:
        handle.remove()
    return got["h"], out


def split_prefix(model, ids: torch.Tensor, att: torch.Tensor, prefix_len: int, what: str = "logits"):
    """(prefix part [1, P, X] or None, remainder [B, T - P, X]) of a right-padded batch, X = V
    logits (``what="logits"``) or H final hidden states (``what="hidden"``, `final_hidden`).

    The first `prefix_len` tokens are identical in every row (the few-shot examples, the system
    prompt): they go through the model once (batch 1), their KV cache is broadcast to the B rows
    and each row's remainder attends to it. Together the two parts equal one plain forward
    (up to float rounding); gradients flow through the shared part once, summed over the rows
    that use it, which is what the per-row computation gives, at a fraction of the compute.
    """
    if what not in ("logits", "hidden"):
        raise ValueError(f"what must be 'logits' or 'hidden', got {what!r}")

    def run(**kw):
        if what == "hidden":
            return final_hidden(model, **kw)
        out = model(**kw)
        return out.logits, out

    B, T = ids.shape
    if prefix_len <= 0:
        return None, run(input_ids=ids, attention_mask=att)[0]
    kw = cache_kwarg(model)
    pre, out = run(input_ids=ids[:1, :prefix_len], use_cache=True)
    cache = out[kw] if kw in out else out["past_key_values"]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(B, -1, -1, -1)
        layer.values = layer.values.expand(B, -1, -1, -1)
    mask = torch.cat([torch.ones((B, prefix_len), dtype=att.dtype, device=att.device), att[:, prefix_len:]], 1)
    pos = (prefix_len + torch.arange(T - prefix_len, device=ids.device)).expand(B, -1)
    rest, _ = run(input_ids=ids[:, prefix_len:], attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
    return pre, rest


def split_prefix_logits(model, ids: torch.Tensor, att: torch.Tensor, prefix_len: int):
    """(prefix logits [1, P, V] or None, remainder logits [B, T - P, V]): `split_prefix`."""
    return split_prefix(model, ids, att, prefix_len, "logits")


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
            with unwrap_parallel(model).disable_adapter():  # forward through the wrapper (FSDP gathers there)
                pre_b, rest_b = split_prefix_logits(model, ids, att, P)
    logits, base = rest_t[:, :-1], rest_b[:, :-1]  # predict columns P+1 .. T-1
    targets, gate = ids[:, P + 1 :], m.decision[:, P + 1 :]
    with torch.no_grad():  # log p_base(x_t) at the gated positions only (the Delta-logp diagnostics)
        base_lp = torch.zeros(targets.shape, dtype=torch.float32, device=base.device)
        base_lp[gate] = token_logprobs(base[gate], targets[gate])
    loss, stats = reasonmaxxer_loss(
        token_logprob=token_logprobs(logits, targets),
        logits_theta=logits,
        logits_base=base,
        advantages=m.advantages,
        gate=gate,
        anchor_mask=m.anchor[:, P + 1 :],
        lam=m.lam,
        dec_denom=dec_denom,
        anc_denom=anc_denom,
        base_token_logprob=base_lp,
    )
    if P == 0:
        return loss, stats
    w = prefix_anchor_rows(m, P)
    if w and m.lam:
        ones = torch.ones((1, P), dtype=torch.bool, device=pre_t.device)
        per_row = isinstance(anc_denom, torch.Tensor)
        denom = 1.0 / prefix_anchor_weight(m, P, anc_denom, w) if per_row else anc_denom / w
        kl = anchor_kl(pre_b, pre_t, ones, denom=denom)
        loss = loss + m.lam * kl
        stats["anchor"] += float(kl.detach())
        stats["anchor_tokens"] += w * P
        stats["loss"] = float(loss.detach())
    return loss, stats


def chunked_head(model):
    """The output head (a plain nn.Linear) if the chunked loss applies to `model`, else None
    (a LoRA on the head, a logit soft-cap or scale, no separable head)."""
    inner = inner_model(model)
    if logit_postprocess(inner) is not None:
        return None
    try:
        _, head = split_decoder_head(inner)
    except Exception:  # noqa: BLE001 - any model we cannot split takes the logits path
        return None
    return head if type(head) is torch.nn.Linear else None


def chunked_micro_batch_loss(model, frozen, ids, att, m, prefix_len: int, dec_denom: float, anc_denom: float):
    """`micro_batch_loss` from final hidden states through `core.chunked.chunked_head_loss`:
    no [B, T, V] logits (theta or base) exist. Same arguments, same (loss, stats); the model
    must have a plain head (`chunked_head`)."""
    P, lam = prefix_len, m.lam
    head = chunked_head(model)
    base_head = chunked_head(frozen) if frozen is not None else None
    pre_t, rest_t = split_prefix(model, ids, att, P, "hidden")
    with torch.no_grad():
        if not lam:
            pre_b = rest_b = None
        elif frozen is not None:
            pre_b, rest_b = split_prefix(frozen, ids, att, P, "hidden")
        else:
            with unwrap_parallel(model).disable_adapter():
                pre_b, rest_b = split_prefix(model, ids, att, P, "hidden")
    gate, anchor = m.decision[:, P + 1 :], m.anchor[:, P + 1 :]
    anchored = anchor if lam else torch.zeros_like(anchor)
    pos, dec_w, anc_w = head_loss_weights(m.advantages, gate, anchored, lam, dec_denom, anc_denom)
    adv_rows = torch.where(gate.reshape(-1)[pos], m.advantages.float()[:, None].expand(gate.shape).reshape(-1)[pos], 0)
    H = rest_t.shape[-1]

    def rows(x):  # [B, T-P, H] -> [N, H]: the positions predicting columns P+1.. that matter
        return None if x is None else x[:, :-1].reshape(-1, H)[pos]

    base_kw = {} if base_head is None else {"weight_base": base_head.weight, "bias_base": base_head.bias}
    loss, st = chunked_head_loss(
        rows(rest_t),
        rows(rest_b),
        head.weight,
        ids[:, P + 1 :].reshape(-1)[pos],
        dec_w,
        anc_w,
        bias=head.bias,
        adv_rows=adv_rows,
        **base_kw,
    )
    per_row = isinstance(anc_denom, torch.Tensor)  # per-sequence: anchor_loss / lam = sum of KL / row denom
    stats = {
        "loss": st["loss"],
        "decision": st["decision"],
        "anchor": (st["anchor_loss"] / lam if per_row else st["anchor_kl_sum"] / anc_denom) if lam else 0.0,
        "gated_tokens": int(gate.bool().sum()),
        "anchor_tokens": int(anchor.bool().sum()) if lam else 0,
        **{k: st[k] for k in DIAGNOSTICS},
    }
    if P == 0:
        return loss, stats
    w = prefix_anchor_rows(m, P)
    if w and lam:
        factor = prefix_anchor_weight(m, P, anc_denom, w)
        weight = torch.full((P,), lam * factor if per_row else lam * w / anc_denom, device=pre_t.device)
        kl, st = chunked_head_loss(
            pre_t[0],
            pre_b[0],
            head.weight,
            ids[0, 1 : P + 1],
            torch.zeros_like(weight),
            weight,
            bias=head.bias,
            **base_kw,
        )
        loss = loss + kl
        stats["anchor"] += factor * st["anchor_kl_sum"] if per_row else w * st["anchor_kl_sum"] / anc_denom
        stats["anchor_tokens"] += w * P
        stats["loss"] = float(loss.detach())
    return loss, stats


def prefix_anchor_rows(m, P: int) -> int:
    """How many rows anchor the shared prefix's P predictions (columns 1..P): all or none of
    them per row; the prefix is never gated (prompt tokens)."""
    if m.decision[:, 1 : P + 1].any():
        raise ValueError("shared prefix positions cannot be gated (they are prompt tokens)")
    pre_anchor = m.anchor[:, 1 : P + 1]  # [B, P]
    rows = pre_anchor.all(1)
    if not torch.equal(rows, pre_anchor.any(1)):
        raise ValueError("anchor mask must be uniform over the shared prefix")
    return int(rows.sum())


def prefix_anchor_weight(m, P: int, anc_denom, w: int) -> float:
    """The total anchor weight of one shared-prefix position, summed over the w rows that anchor
    it: w / anc_denom (a step count), or sum over those rows of 1 / anc_denom[b] ([B] per-row
    denominators, per-sequence normalisation)."""
    if not isinstance(anc_denom, torch.Tensor):
        return w / anc_denom
    rows = m.anchor[:, 1 : P + 1].all(1)  # [B]
    return float((1.0 / anc_denom.double().to(rows.device))[rows].sum())
