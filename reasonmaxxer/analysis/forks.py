"""analysis.forks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import model_device
from ..stages.train import TrainExample
from .tokens import argmax_change


def report_examples(model, tokenizer, examples: Sequence[TrainExample], gates, k: int = 4) -> list[dict]:
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for i in picks:
        e = examples[i]
        ids = torch.tensor([list(e.prompt_ids) + list(e.completion_ids)], device=model_device(base))
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0, len(e.prompt_ids) - 1 : -1].float().cpu()  # [C, V]
        probs = logits.softmax(-1)
        toks = []
        for t, tid in enumerate(e.completion_ids):
            item = {
                "text": tokenizer.decode([tid]),
                "entropy": round(float(e.entropies[t]), 4),
                "gated": bool(gates[i][t]),
            }
            if item["gated"]:
                pv, pi = probs[t].topk(5)
                item["top5"] = [[tokenizer.decode([int(j)]), round(float(p), 4)] for p, j in zip(pv, pi)]
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
    base, tuned, tokenizer, examples: Sequence[TrainExample], gates, *, limit: int = 32, batch: int = 8, top: int = 12
) -> dict:
    """Where the trained model's argmax differs from the base's, teacher-forced on training rollouts.

    Over the completion tokens of up to `limit` rollouts: the % of positions whose argmax
    changed, the % of those whose new token is in the base top-5, the mean base entropy
    (nats) at changed vs unchanged positions, how many changes sit at gated positions, and
    the most frequent (base token -> tuned token) changes with their counts.
    """
    from ..stages.batch_loss import shared_prefix_len, split_prefix_logits
    from ..stages.train import batch_tensors

    pad = tokenizer.pad_token_id or 0
    n_pos = n_changed = n_top5 = n_gated_changed = 0
    ent_changed, ent_same = [], []
    pairs: dict[tuple[str, str], list] = {}
    exs = list(examples[:limit])
    for i in range(0, len(exs), batch):
        chunk = exs[i : i + batch]
        ids, att, comp, ent, _, _ = batch_tensors(chunk, pad)
        P = shared_prefix_len(ids, att, comp)
        with torch.no_grad():
            outs = []
            for mdl in (base, tuned):
                dev = model_device(mdl)
                pre, rest = split_prefix_logits(mdl, ids.to(dev), att.to(dev), P)
                full = rest if pre is None else torch.cat([pre.expand(len(chunk), -1, -1), rest], 1)
                outs.append(full[:, :-1].float().cpu())  # column t+1 predicted at t
        b_log, t_log = outs
        for j, e in enumerate(chunk):
            p, c = len(e.prompt_ids), len(e.completion_ids)
            rows = slice(p - 1, p + c - 1)  # logits predicting the completion tokens
            b_arg, t_arg, _, cls = argmax_change(b_log[j, rows], t_log[j, rows], k=5)  # [c] each
            n_pos += c
            for k in range(c):
                h = e.entropies[k]
                if int(cls[k]) != 0:
                    n_changed += 1
                    ent_changed.append(h)
                    n_top5 += int(cls[k]) == 1
                    n_gated_changed += int(bool(gates[i + j][k]))
                    key = (tokenizer.decode([int(b_arg[k])]), tokenizer.decode([int(t_arg[k])]))
                    pairs.setdefault(key, []).append(h)
                else:
                    ent_same.append(h)
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
