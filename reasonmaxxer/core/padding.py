"""core.padding: token-id lists -> padded [B, T] batches (ids and attention mask)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # [B, T]
    att = torch.zeros((len(seqs), T), dtype=torch.long)  # [B, T]
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span] = torch.as_tensor(list(s), dtype=torch.long)
        att[i, span] = 1
    return ids, att


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """B token-id sequences -> (ids [B, T] int64, attention [B, T] int64: 1 on tokens, 0 on pads),
    T the longest length; each row's tokens first, then ``pad_id``."""
    return _pad(seqs, pad_id, left=False)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """As `pad_right`, the pads first (for decoding: every row's last token in the last column)."""
    return _pad(seqs, pad_id, left=True)
