"""What training changed, teacher-forced on the training rollouts, in bounded memory.

`fork_changes` (where the trained argmax differs from the base's) and `report_examples` (a
few rollouts token by token, the base top-5 at gated positions) need per-position statistics
over the full vocabulary, never the [B, T, V] logits: `positions.position_logits` yields
[chunk, V] fp32 blocks from the final hidden states, and only the few numbers per position
the reports use are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import inner_model, model_device
from ..stages.train import TrainExample, batch_tensors
from .positions import position_logits
from .tokens import argmax_change


def completion_rows(examples: Sequence[TrainExample]) -> list[tuple[int, int]]:
    """(row, column) of the positions predicting each completion token, example by example."""
    return [(j, len(e.prompt_ids) - 1 + k) for j, e in enumerate(examples) for k in range(len(e.completion_ids))]


def report_examples(
    model, tokenizer, examples: Sequence[TrainExample], gates, k: int = 4, chunk: int = 256
) -> list[dict]:
    """A few training rollouts token by token, with the base top-5 at gated positions."""
    picks, seen = [], set()
    for i, e in enumerate(examples):
        if e.key and e.key[0] in seen:
            continue
        if int(gates[i].sum()) == 0:
            continue
        picks.append(i)
        seen.add(e.key[0] if e.key else i)
        if len(picks) >= k:
            break
    out = []
    base = inner_model(model)
    pad = tokenizer.pad_token_id or 0
    for i in picks:
        e = examples[i]
        ids, att, *_ = batch_tensors([e], pad)
        gated = [t for t in range(len(e.completion_ids)) if bool(gates[i][t])]
        rows = [(0, len(e.prompt_ids) - 1 + t) for t in gated]
        top5 = {}
        with torch.no_grad():
            dev = model_device(base)
            logits = position_logits(base, ids.to(dev), att.to(dev), rows, chunk)
            for s, block in zip(range(0, len(rows), chunk), logits):
                pv, pi = block.softmax(-1).topk(5)  # [c, 5]
                for j in range(block.shape[0]):
                    top5[gated[s + j]] = [
                        [tokenizer.decode([int(x)]), round(float(q), 4)] for q, x in zip(pv[j].tolist(), pi[j].tolist())
                    ]
        toks = []
        for t, tid in enumerate(e.completion_ids):
            item = {"text": tokenizer.decode([tid]), "entropy": round(float(e.entropies[t]), 4), "gated": t in top5}
            if item["gated"]:
                item["top5"] = top5[t]
            toks.append(item)
        out.append(
            {
                "problem_id": e.key[0] if e.key else str(i),
                "correct": e.correct,
                "advantage": round(e.advantage, 4),
                "tokens": toks,
            }
        )
    return out


def fork_changes(
    base,
    tuned,
    tokenizer,
    examples: Sequence[TrainExample],
    gates,
    *,
    limit: int = 32,
    batch: int = 8,
    top: int = 12,
    chunk: int = 256,
) -> dict:
    """Where the trained model's argmax differs from the base's, teacher-forced on training rollouts.

    Over the completion tokens of up to `limit` rollouts: the % of positions whose argmax
    changed, the % of those whose new token is in the base top-5, the mean base entropy
    (nats) at changed vs unchanged positions, how many changes sit at gated positions, and
    the most frequent (base token -> tuned token) changes with their counts. Memory: the
    hidden states of `batch` rollouts and two [chunk, V] blocks of logits (`position_logits`).
    """
    pad = tokenizer.pad_token_id or 0
    n_pos = n_changed = n_top5 = n_gated_changed = 0
    ent_changed, ent_same = [], []
    pairs: dict[tuple[str, str], list] = {}
    exs = list(examples[:limit])
    for i in range(0, len(exs), batch):
        part = exs[i : i + batch]
        ids, att, *_ = batch_tensors(part, pad)
        rows = completion_rows(part)
        b_arg, t_arg, cls = [], [], []
        with torch.no_grad():
            streams = [
                position_logits(m, ids.to(model_device(m)), att.to(model_device(m)), rows, chunk) for m in (base, tuned)
            ]
            for bl, tl in zip(*streams):
                ba, ta, _, c = argmax_change(bl, tl.to(bl.device), k=5)  # [c] each
                b_arg += ba.tolist()
                t_arg += ta.tolist()
                cls += c.tolist()
        n = 0
        for j, e in enumerate(part):
            for k in range(len(e.completion_ids)):
                h = e.entropies[k]
                n_pos += 1
                if cls[n] != 0:
                    n_changed += 1
                    ent_changed.append(h)
                    n_top5 += cls[n] == 1
                    n_gated_changed += int(bool(gates[i + j][k]))
                    key = (tokenizer.decode([b_arg[n]]), tokenizer.decode([t_arg[n]]))
                    pairs.setdefault(key, []).append(h)
                else:
                    ent_same.append(h)
                n += 1
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    common = sorted(pairs.items(), key=lambda kv: -len(kv[1]))[:top]
    return {
        "positions": n_pos,
        "changed": n_changed,
        "changed_fraction": n_changed / max(1, n_pos),
        "changed_in_base_top5": n_top5,
        "changed_at_gated": n_gated_changed,
        "mean_entropy_changed": mean(ent_changed),
        "mean_entropy_unchanged": mean(ent_same),
        "most_common": [{"base": a, "tuned": b, "count": len(v), "mean_base_entropy": mean(v)} for (a, b), v in common],
    }
