"""Per-position comparison of a base and a tuned model's next-token distributions (method.md section 2).

The tensor side of `tokens.analyze`: `argmax_change` classifies each position [paper Eq. 3]
(0 unshifted: same argmax, 1 reranked: tuned argmax in the base top-k, 2 shifted: outside it),
`compare_distributions` adds the base entropy, both KL directions and Jensen-Shannon,
`top_probs` keeps each model's most probable tokens, `completion_stats` runs both models
teacher-forced over a right-padded batch a bounded block of positions at a time, and
`summarize` aggregates the per-position arrays into the section-2 report.

Units: entropies and divergences in nats (1 nat = 1.4427 bits), over the FULL vocabulary, from
raw (untempered) logits. Ranks are 1-based: rank 1 is the base argmax. Ties follow
``torch.argmax`` (first index wins).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.entropy import token_entropy
from ..core.stats import auroc
from ..errors import ReasonMaxxerError
from ..models import model_device

CLS_NAMES = ("unshifted", "reranked", "shifted")


PER_POSITION_KEYS = (
    "base_entropy",
    "base_argmax",
    "tuned_argmax",
    "tuned_rank_in_base",
    "kl_base_tuned",
    "kl_tuned_base",
    "js",
    "cls",
)


TOP_N = 5  # top tokens (with probabilities) stored per position


_LN2 = math.log(2.0)


@torch.no_grad()
def argmax_change(b: Tensor, t: Tensor, k: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Argmax change between base and tuned logits at the same positions: b, t [c, V] fp32 ->
    (base_argmax, tuned_argmax, tuned_rank_in_base, cls), [c] each.

    tuned_rank_in_base: 1 = base argmax; position of the tuned argmax in the base logits'
    stable descending order (ties by token id). cls: 0 unshifted (same argmax) / 1 reranked
    (tuned argmax in the base top-k) / 2 shifted. The one classification used by
    `compare_distributions` and `analysis.forks.fork_changes`.
    """
    ba, ta = b.argmax(-1), t.argmax(-1)  # [c]
    bt = b.gather(1, ta[:, None])  # [c, 1] base logit of tuned argmax
    idx = torch.arange(b.shape[1], device=b.device)[None]  # [1, V]
    rank = 1 + (b > bt).sum(-1) + ((b == bt) & (idx < ta[:, None])).sum(-1)  # [c]
    cls = torch.where(ba == ta, 0, torch.where(rank <= k, 1, 2))  # [c]
    return ba, ta, rank, cls


def compare_distributions(
    base_logits: Tensor, tuned_logits: Tensor, k: int = 5, chunk_size: int = 64
) -> dict[str, Tensor]:
    """Per-position comparison of two next-token distributions at the same positions.

    base_logits, tuned_logits: [N, V] raw logits (teacher-forced, same prefixes). Returns [N] each:
    base_entropy (nats, fp32), base_argmax / tuned_argmax (long), tuned_rank_in_base (long, 1 = base
    argmax; position of the tuned argmax in base's stable descending order), kl_base_tuned =
    KL(base || tuned), kl_tuned_base = KL(tuned || base), js = Jensen-Shannon (nats, <= ln 2), and
    cls (long: 0 unshifted / 1 reranked: tuned argmax in base top-k / 2 shifted).
    Identical rows give exactly 0 for KL and JS. Computed in fp32, ``chunk_size`` rows at a time.
    """
    if base_logits.shape != tuned_logits.shape or base_logits.dim() != 2:
        raise ReasonMaxxerError(
            f"analysis: logits must both be [N, V] of the same shape "
            f"(got {tuple(base_logits.shape)} and {tuple(tuned_logits.shape)})"
        )
    if k < 1:
        raise ReasonMaxxerError(f"analysis: k must be >= 1 (got {k})")
    N = base_logits.shape[0]
    out = {name: [] for name in PER_POSITION_KEYS if name != "base_entropy"}
    for s in range(0, N, chunk_size):
        b = base_logits[s : s + chunk_size].float()  # [c, V]
        t = tuned_logits[s : s + chunk_size].to(b.device).float()  # [c, V]
        lp = torch.log_softmax(b, -1)  # [c, V] log p (base)
        lq = torch.log_softmax(t, -1)  # [c, V] log q (tuned)
        p, q = lp.exp(), lq.exp()
        ba, ta, rank, cls = argmax_change(b, t, k)  # [c] each
        d = lq - lp  # [c, V] log q/p
        kl_pq = torch.where(p > 0, p * -d, 0.0).sum(-1)  # [c] KL(p||q)
        kl_qp = torch.where(q > 0, q * d, 0.0).sum(-1)  # [c] KL(q||p)
        # m = (p + q) / 2: log p/m = ln2 - softplus(log q/p), exactly 0 where p == q
        lpm = torch.where(d == 0, 0.0, _LN2 - torch.nn.functional.softplus(d))  # [c, V]
        lqm = torch.where(d == 0, 0.0, _LN2 - torch.nn.functional.softplus(-d))  # [c, V]
        js = 0.5 * (torch.where(p > 0, p * lpm, 0.0).sum(-1) + torch.where(q > 0, q * lqm, 0.0).sum(-1))
        for name, v in (
            ("base_argmax", ba),
            ("tuned_argmax", ta),
            ("tuned_rank_in_base", rank),
            ("kl_base_tuned", kl_pq.clamp_min(0)),
            ("kl_tuned_base", kl_qp.clamp_min(0)),
            ("js", js.clamp_min(0)),
            ("cls", cls),
        ):
            out[name].append(v)
    res = {name: torch.cat(v) if v else torch.zeros(0) for name, v in out.items()}
    res["base_entropy"] = token_entropy(base_logits) if N else torch.zeros(0)
    for name in ("base_argmax", "tuned_argmax", "tuned_rank_in_base", "cls"):
        res[name] = res[name].long()
    return {name: res[name] for name in PER_POSITION_KEYS}


@torch.no_grad()
def top_probs(logits: Tensor, n: int = TOP_N, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The n most probable tokens of each row of raw logits [N, V]: (ids [N, n] long, probs [N, n] fp32),
    descending (softmax over the full vocabulary, no temperature)."""
    n = min(n, logits.shape[-1])
    ids, probs = [], []
    for s in range(0, logits.shape[0], chunk_size):
        p = torch.softmax(logits[s : s + chunk_size].float(), -1)  # [c, V]
        v, i = torch.topk(p, n, dim=-1)  # [c, n]
        ids.append(i)
        probs.append(v)
    if not ids:
        return torch.zeros(0, n, dtype=torch.long), torch.zeros(0, n)
    return torch.cat(ids), torch.cat(probs)


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def summarize(per_pos: dict, position_frac: Tensor | None = None, js_threshold: float = 0.1, k: int = 5) -> dict:
    """Aggregate per-position comparisons (the `compare_distributions` keys, [N] each, all
    trajectories concatenated) into the section-2 report. Percentages are 0-100; entropies nats.

    position_frac [N]: relative position of each token in its completion, in [0, 1)
    (j / length); gives where changes (cls != 0) sit, in 10 bins. The AUROC treats
    "reranked" (cls 1) as positive and every other position (unshifted and shifted) as negative.
    nan where a quantity is undefined (no positions of that class).
    """
    cls = torch.as_tensor(per_pos["cls"]).long()
    n = cls.numel()
    ent = torch.as_tensor(per_pos["base_entropy"], dtype=torch.float64)
    rank = torch.as_tensor(per_pos["tuned_rank_in_base"]).long()
    js = torch.as_tensor(per_pos["js"], dtype=torch.float64)
    changed = cls != 0
    pct = (lambda m: 100.0 * float(m.sum()) / n) if n else (lambda m: float("nan"))
    hist = {str(r): int((rank == r).sum()) for r in range(1, k + 1)}
    hist[f">{k}"] = int((rank > k).sum())
    e_rr, e_un = _mean(ent[cls == 1]), _mean(ent[cls == 0])
    qs = (0.5, 0.9, 0.99)
    js_q = {f"p{round(q * 100)}": float(torch.quantile(js, q)) if n else float("nan") for q in qs}
    js_q["max"] = float(js.max()) if n else float("nan")
    js_q["mean"] = _mean(js)
    out = {
        "k": k,
        "n_positions": n,
        "n_unshifted": int((cls == 0).sum()),
        "n_reranked": int((cls == 1).sum()),
        "n_shifted": int((cls == 2).sum()),
        "reranked_pct": pct(cls == 1),
        "shifted_pct": pct(cls == 2),
        "changed_pct": pct(changed),
        "rank_hist": hist,
        "mean_tuned_rank_changed": _mean(rank[changed].double()),
        "entropy_reranked": e_rr,
        "entropy_unshifted": e_un,
        "entropy_shifted": _mean(ent[cls == 2]),
        "entropy_ratio": e_rr / e_un if e_un > 0 else float("nan"),
        "auroc_entropy_reranked": auroc(ent, cls == 1),
        "js_quantiles": js_q,
        "js_threshold": js_threshold,
        "js_frac_above": float((js > js_threshold).double().mean()) if n else float("nan"),
        "kl_base_tuned_mean": _mean(torch.as_tensor(per_pos["kl_base_tuned"])),
        "kl_tuned_base_mean": _mean(torch.as_tensor(per_pos["kl_tuned_base"])),
    }
    if position_frac is not None:
        f = torch.as_tensor(position_frac, dtype=torch.float64)
        b = (f * 10).floor().long().clamp(0, 9)  # [N] bin of each position
        all_h = torch.bincount(b, minlength=10)
        ch_h = torch.bincount(b[changed], minlength=10)
        out["change_position_hist"] = ch_h.tolist()
        out["position_hist"] = all_h.tolist()
        out["change_rate_by_position"] = [
            float(c) / float(a) if a else float("nan") for c, a in zip(ch_h.tolist(), all_h.tolist())
        ]
    return out


@torch.no_grad()
def completion_stats(
    base_model, tuned_model, ids: Tensor, att: Tensor, prefix_len: int, spans, *, k: int, top_n: int, chunk: int = 256
) -> list[dict[str, Tensor]]:
    """Per completion token of each row, both models teacher-forced: the `compare_distributions`
    arrays and each model's top_n (ids, probs), [c_i] / [c_i, top_n] per row, on the CPU.

    ids/att [B, T] right-padded; spans: (prompt length p_i, completion length c_i) per row; the
    logits predicting completion token j sit at column p_i - 1 + j. Both models' logits come
    `chunk` positions at a time (`positions.position_logits`): memory is two [chunk, V] fp32
    blocks besides the hidden states, never the [B, T, V] logits of the batch.
    """
    from .positions import position_logits

    rows = [(i, p - 1 + j) for i, (p, c) in enumerate(spans) for j in range(c)]
    streams = [
        position_logits(m, ids.to(model_device(m)), att.to(model_device(m)), rows, chunk, prefix_len=prefix_len)
        for m in (base_model, tuned_model)
    ]
    parts: dict[str, list[Tensor]] = {}
    for b, t in zip(*streams):  # [c, V] fp32 each
        t = t.to(b.device)
        d = compare_distributions(b, t, k=k)
        for who, x in (("base", b), ("tuned", t)):
            d[f"{who}_top_ids"], d[f"{who}_top_p"] = top_probs(x, top_n)  # [c, top_n] each
        for name, v in d.items():
            parts.setdefault(name, []).append(v.cpu())
    lengths = [c for _, c in spans]
    cat = {name: torch.cat(v) for name, v in parts.items()}
    return [dict(zip(cat, vs)) for vs in zip(*(torch.split(v, lengths) for v in cat.values()))]
