"""analysis.forks.fork_changes on a hand-built bigram pair: counts fixed by construction."""

from types import SimpleNamespace

import pytest
import torch

from reasonmaxxer.analysis.forks import fork_changes
from reasonmaxxer.stages.train import TrainExample

V = 8


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on one token."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


class Tok:
    pad_token_id = 0

    def decode(self, ids):
        return "t" + "".join(map(str, ids))


def _tables():
    base = torch.zeros(V, V)
    base[:, 0] = 9.0  # base argmax 0 everywhere
    tuned = base.clone()
    base[3, :6] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    tuned[3] = base[3]
    tuned[3, 1] = 10.0  # after 3: tuned argmax 1, base rank 2 -> reranked
    tuned[4, 7] = 10.0  # after 4: tuned argmax 7, base rank 8 -> shifted
    base[6, :6] = 9.0  # after 6: tokens 0..5 tied in base; ties rank by id, so 5 has rank 6
    tuned[6] = base[6]
    tuned[6, 5] = 10.0  # -> shifted (rank 6 > 5), whatever order topk would give the tie
    return base, tuned


def test_fork_changes_hand_built_counts():
    base, tuned = (Bigram(t) for t in _tables())
    ex = [
        TrainExample((1, 2), (3, 4, 5), (0.1, 0.2, 0.3), 1.0, True),  # inputs 2, 3, 4: cls 0, 1, 2
        TrainExample((2,), (6, 1), (0.4, 0.5), 1.0, True),  # inputs 2, 6: cls 0, 2
    ]
    gates = [torch.tensor([True, False, True]), torch.tensor([False, True])]
    got = fork_changes(base, tuned, Tok(), ex, gates)
    assert (got["positions"], got["changed"], got["changed_in_base_top5"], got["changed_at_gated"]) == (5, 3, 1, 2)
    assert got["changed_fraction"] == pytest.approx(3 / 5)
    assert got["mean_entropy_changed"] == pytest.approx((0.2 + 0.3 + 0.5) / 3)
    assert got["mean_entropy_unchanged"] == pytest.approx((0.1 + 0.4) / 2)
    pairs = {(m["base"], m["tuned"]): m["count"] for m in got["most_common"]}
    assert pairs == {("t0", "t1"): 1, ("t0", "t7"): 1, ("t0", "t5"): 1}
    same = fork_changes(base, base, Tok(), ex, gates)
    assert (same["positions"], same["changed"]) == (5, 0)
