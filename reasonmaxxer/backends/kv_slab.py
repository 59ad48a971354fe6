"""The HF sampler's KV cache: one preallocated "slab" per layer, written in place.

`SlabLayer` is a transformers cache layer backed by a [B, heads, capacity, head_dim] buffer
that grows by 1.5x (plus `SlabLayer.headroom` columns) only when full, instead of HF's
``torch.cat`` per step. `repack` rebuilds every layer's slab when the batch changes (finished
rows dropped, waiting requests admitted): the live rows are compacted (their all-padding left
columns trimmed), the new rows' prefill KV is appended below them, and both are right-aligned
to a common length, so the next decode step writes one column for every row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class SlabLayer(DynamicLayer):
    """KV cache layer backed by a preallocated [B, heads, capacity, head_dim] buffer."""

    headroom = 64

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.kbuf = key_states.new_empty((b, h, self.headroom, d))
        self.vbuf = value_states.new_empty((b, h, self.headroom, d))
        self.n = 0
        self.is_initialized = True

    def set(self, kbuf, vbuf, n):
        self.kbuf, self.vbuf, self.n, self.is_initialized = kbuf, vbuf, n, True
        self.keys, self.values = kbuf[:, :, :n], vbuf[:, :, :n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.n + q > self.kbuf.shape[-2]:
            cap = max(self.n + q + self.headroom, int(self.kbuf.shape[-2] * 1.5))
            k2 = self.kbuf.new_empty(self.kbuf.shape[:2] + (cap,) + self.kbuf.shape[3:])
            v2 = self.vbuf.new_empty(k2.shape)
            k2[:, :, : self.n] = self.kbuf[:, :, : self.n]
            v2[:, :, : self.n] = self.vbuf[:, :, : self.n]
            self.kbuf, self.vbuf = k2, v2
        self.kbuf[:, :, self.n : self.n + q] = key_states
        self.vbuf[:, :, self.n : self.n + q] = value_states
        self.n += q
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0


class SlabCache(DynamicCache):
    """A transformers cache of `num_layers` `SlabLayer`s."""

    def __init__(self, num_layers: int):
        Cache.__init__(self, layers=[SlabLayer() for _ in range(num_layers)])


def filled_kv(cache: SlabCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (keys, values) written so far: views [B, heads, n, head_dim] of the slabs."""
    return [(layer.kbuf[:, :, : layer.n], layer.vbuf[:, :, : layer.n]) for layer in cache.layers]


def seed_with_prefix(cache: SlabCache, prefix_kv, b: int, prefix_len: int, width: int) -> None:
    """Give each layer of a fresh `cache` a slab of `b` rows and `prefix_len + width` columns
    whose first `prefix_len` columns hold the shared prefix's KV (`prefix_kv`, one row) in every row."""
    for layer, (k, v) in zip(cache.layers, prefix_kv):
        kb = k.new_empty((b, k.shape[1], prefix_len + width, k.shape[3]))
        vb = v.new_empty(kb.shape)
        kb[:, :, :prefix_len] = k
        vb[:, :, :prefix_len] = v
        layer.set(kb, vb, prefix_len)


def live_columns(mask: torch.Tensor, keep: list[int]) -> int:
    """The first cache column any row of `keep` attends to (`mask.shape[1]`: none, or no rows)."""
    n_old = mask.shape[1]
    if not keep:
        return n_old
    used = mask[keep].any(0).nonzero()
    return int(used[0]) if len(used) else n_old


def repack(cache: SlabCache, mask: torch.Tensor, keep: list[int], new_kv, new_mask, extra: int) -> torch.Tensor:
    """Rebuild every layer's slab for the rows `keep` (from their first live column, `live_columns`)
    followed by the admitted rows (`new_kv` per layer, attention mask `new_mask`; both None when none
    were admitted), right-aligned to L = the longer of the two; capacity L + max(headroom,
    `extra`), zero-filled. Returns the new attention mask [len(keep) + admitted, L]."""
    admit = new_kv is not None
    n_old = mask.shape[1]
    first = live_columns(mask, keep)
    live_len = n_old - first
    m = new_mask.shape[1] if admit else 0
    L = max(live_len, m)
    n_keep = len(keep)
    tot = n_keep + (new_mask.shape[0] if admit else 0)
    keep_t = torch.tensor(keep, dtype=torch.long)
    cap = L + max(SlabLayer.headroom, extra)
    for li, layer in enumerate(cache.layers):
        ref = new_kv[li][0] if admit else layer.kbuf
        kb = ref.new_zeros((tot, ref.shape[1], cap, ref.shape[3]))
        vb = ref.new_zeros(kb.shape)
        if keep:
            idx = keep_t.to(layer.kbuf.device)
            kb[:n_keep, :, L - live_len : L] = layer.kbuf[idx, :, first:n_old]
            vb[:n_keep, :, L - live_len : L] = layer.vbuf[idx, :, first:n_old]
        if admit:
            kb[n_keep:, :, L - m : L] = new_kv[li][0]
            vb[n_keep:, :, L - m : L] = new_kv[li][1]
        layer.set(kb, vb, L)
    mask2 = torch.zeros((tot, L), dtype=torch.long)
    if keep:
        mask2[:n_keep, L - live_len :] = mask[keep_t, first:]
    if admit:
        mask2[n_keep:, L - m :] = new_mask
    return mask2
