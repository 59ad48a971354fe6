"""Teacher-forced next-token logits at chosen positions, a bounded block at a time.

The one implementation behind every per-position statistic of `analysis` (`tokens.analyze`,
`forks.fork_changes`, `forks.report_examples`): the final hidden states [B, T, H] come from one
forward (`stages.batch_loss.split_prefix`, shared prefix encoded once), and the output head is
applied to `chunk` positions at a time in fp32, so at most one [chunk, V] fp32 block of logits
exists, never the [B, T, V] logits of the batch (40 GB at B = 8, T = 8192, V = 151,936).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..models import fp32_head_weight
from ..stages.batch_loss import chunked_head, shared_prefix_len, split_prefix


def _full(pre, rest, B: int) -> torch.Tensor:
    """prefix [1, P, X] (or None) and remainder [B, T - P, X] -> [B, T, X] (the prefix broadcast)."""
    return rest if pre is None else torch.cat([pre.expand(B, -1, -1), rest], 1)


def position_logits(
    model, ids, att, rows: Sequence[tuple[int, int]], chunk: int = 256, *, prefix_len: int | None = None
) -> Iterator[torch.Tensor]:
    """fp32 logits [c, V] at the positions `rows` ((row, column) pairs of the right-padded batch
    ids/att [B, T] on the model's device; column j predicts token j + 1), `chunk` positions at
    a time, in order.

    The hidden states come from one forward, the prefix shared by every row (`prefix_len`,
    default `shared_prefix_len(ids, att)`) encoded once; the head is applied per chunk in fp32
    (a bf16 head through its fp32 copy, `models.fp32_head_weight`), so at most [chunk, V]
    logits exist. A model without a plain linear head (`chunked_head` is None: LoRA on lm_head,
    a logit soft-cap, a wrapper editing the logits) takes its own logits of the whole batch
    ([B, T, V], model dtype), each block upcast to fp32.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    P = shared_prefix_len(ids, att) if prefix_len is None else prefix_len
    head = chunked_head(model)
    b = torch.tensor([r for r, _ in rows], dtype=torch.long, device=ids.device)  # [N]
    t = torch.tensor([c for _, c in rows], dtype=torch.long, device=ids.device)  # [N]
    if head is None:
        full = _full(*split_prefix(model, ids, att, P, "logits"), ids.shape[0])  # [B, T, V]
        for s in range(0, len(rows), chunk):
            yield full[b[s : s + chunk], t[s : s + chunk]].float()
        return
    hidden = _full(*split_prefix(model, ids, att, P, "hidden"), ids.shape[0])  # [B, T, H]
    w = fp32_head_weight(head)
    w = head.weight.float() if w is None else w  # [V, H] fp32
    bias = None if head.bias is None else head.bias.float()
    for s in range(0, len(rows), chunk):
        h = hidden[b[s : s + chunk], t[s : s + chunk]].float()  # [c, H]
        yield h @ w.t() if bias is None else torch.addmm(bias, h, w.t())
