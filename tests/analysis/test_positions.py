"""`positions.position_logits` and the chunked per-position analysis against the full-logits path.

The old analysis took each model's [B, T, V] logits of a batch and sliced the completion rows;
the chunked path applies the head to `chunk` positions at a time from the final hidden states.
Both must give the same numbers (to float rounding), and the chunked one no [B, T, V] tensor.
"""

import pytest
import torch
from conftest import make_tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from reasonmaxxer.analysis.positions import position_logits
from reasonmaxxer.analysis.tokens import PER_POSITION_KEYS, compare_distributions, completion_stats, top_probs
from reasonmaxxer.stages.batch_loss import chunked_head, shared_prefix_len

V = 1000  # large enough that [B, T, V] dwarfs every other tensor of the tiny model


@pytest.fixture(scope="module")
def pair():
    return make_tiny_model(V, seed=1, init_std=0.2), make_tiny_model(V, seed=2, init_std=0.2, arch="qwen2")


def _batch():
    """Right-padded [3, 14] batch sharing a 4-token prefix; spans (prompt length, completion length)."""
    g = torch.Generator().manual_seed(0)
    shared = [5, 6, 7, 8]
    rows = [shared + torch.randint(3, V, (n,), generator=g).tolist() for n in (10, 7, 9)]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    att = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    spans = [(6, 8), (5, 6), (7, 5)]  # completion = the tokens after the prompt, up to the row's end
    return ids, att, spans


def _old_path(base, tuned, ids, att, spans, k=5, top_n=5):
    """The full-logits analysis: [B, T, V] logits of each model, completion rows sliced per row."""
    lb, lt = base(input_ids=ids, attention_mask=att).logits, tuned(input_ids=ids, attention_mask=att).logits
    out = []
    for i, (p, c) in enumerate(spans):
        b, t = lb[i, p - 1 : p + c - 1], lt[i, p - 1 : p + c - 1]  # [c, V]
        d = compare_distributions(b, t, k=k)
        for who, x in (("base", b), ("tuned", t)):
            d[f"{who}_top_ids"], d[f"{who}_top_p"] = top_probs(x, top_n)
        out.append(d)
    return out


@pytest.mark.parametrize("chunk", [1, 4, 256])
def test_chunked_equals_full_logits(pair, chunk):
    base, tuned = pair
    assert chunked_head(base) is not None and chunked_head(tuned) is not None  # the hidden-state path runs
    ids, att, spans = _batch()
    P = shared_prefix_len(ids, att)
    assert P == 4
    new = completion_stats(base, tuned, ids, att, P, spans, k=5, top_n=5, chunk=chunk)
    old = _old_path(base, tuned, ids, att, spans)
    assert len(new) == len(old) == 3
    for n, o, (_, c) in zip(new, old, spans):
        assert (
            set(n) == set(o) == set(PER_POSITION_KEYS) | {"base_top_ids", "base_top_p", "tuned_top_ids", "tuned_top_p"}
        )
        for name in ("base_argmax", "tuned_argmax", "tuned_rank_in_base", "cls", "base_top_ids", "tuned_top_ids"):
            assert torch.equal(n[name], o[name]), name
        for name in ("base_entropy", "kl_base_tuned", "kl_tuned_base", "js", "base_top_p", "tuned_top_p"):
            assert n[name].shape[0] == c
            torch.testing.assert_close(n[name], o[name], rtol=1e-5, atol=1e-6)
    assert any(bool((d["cls"] != 0).any()) for d in new)  # two different models: some positions changed


def test_position_logits_equal_model_logits(pair):
    base, _ = pair
    ids, att, _ = _batch()
    rows = [(0, 3), (2, 10), (1, 0), (0, 13), (1, 9)]
    blocks = list(position_logits(base, ids, att, rows, chunk=2))
    assert [b.shape for b in blocks] == [(2, V), (2, V), (1, V)] and all(b.dtype == torch.float32 for b in blocks)
    full = base(input_ids=ids, attention_mask=att).logits  # [B, T, V]
    ref = torch.stack([full[r, c] for r, c in rows])
    torch.testing.assert_close(torch.cat(blocks), ref, rtol=1e-5, atol=1e-5)


class _Largest(TorchDispatchMode):
    """The largest number of elements of any new tensor (not a view) an op returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        seen = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:  # not a view
                self.most = max(self.most, t.numel())
        return out


def test_no_batch_logits(pair):
    """The chunked path never makes a tensor of the batch's [B, T, V] size (the old one does)."""
    base, tuned = pair
    ids, att, spans = _batch()
    B, T = ids.shape
    with _Largest() as m:
        completion_stats(base, tuned, ids, att, shared_prefix_len(ids, att), spans, k=5, top_n=5, chunk=4)
    assert m.most < B * (T - 4) * V
    with _Largest() as m_old:
        _old_path(base, tuned, ids, att, spans)
    assert m_old.most >= B * T * V


def test_mixed_decode_keeps_one_position(pair):
    """The interventions' two-model decoder takes [b, V] logits per step, never [b, P, V]
    of the prompt (`logits_to_keep=1`)."""
    from reasonmaxxer.analysis.intervene import mixed_decode, oracle

    base, tuned = pair
    prompts = [list(range(5, 45)), list(range(7, 37))]  # 40 and 30 tokens
    with _Largest() as m:
        recs = mixed_decode(base, tuned, prompts, oracle(), max_new_tokens=3, eos_ids=set(), batch_size=2)
    assert [len(r["token_ids"]) for r in recs] == [3, 3]
    assert V * 2 <= m.most < 2 * 30 * V
