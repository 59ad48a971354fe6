"""Tests for reasonmaxxer.gating, with counts worked out by hand."""

import pytest
import torch

from reasonmaxxer.core.gating import (
    check_gate_nonempty,
    count_for_fraction,
    entropy_gate,
    gated_fraction,
    random_gate,
    random_gate_like,
    split_tau,
    tau_for_fraction,
)
from reasonmaxxer.errors import ReasonMaxxerError

# Two rows, T = 6. Row 0: 2 prompt tokens then 4 completion tokens; row 1: left padding (1),
# 1 prompt token, 4 completion tokens. Entropies in nats.
ENTROPY = torch.tensor(
    [
        [3.0, 2.5, 0.1, 1.5, 0.0, 2.0],
        [9.9, 5.0, 1.3, 0.2, 1.9, 1.41],
    ]
)
COMPLETION = torch.tensor(
    [
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
    ],
    dtype=torch.bool,
)
# completion entropies: row 0 (0.1, 1.5, 0.0, 2.0), row 1 (1.3, 0.2, 1.9, 1.41); n = 8
# sorted descending: 2.0, 1.9, 1.5, 1.41, 1.3, 0.2, 0.1, 0.0


def test_entropy_gate_scalar_tau():
    # tau = 1.4: row 0 -> 1.5, 2.0 ; row 1 -> 1.9, 1.41 (prompt entropies 3.0/2.5/9.9/5.0 ignored)
    gate = entropy_gate(ENTROPY, COMPLETION, 1.4)
    expected = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(gate, expected)
    assert gated_fraction(gate, COMPLETION) == 4 / 8
    # strict inequality: at tau = 1.5 the position with entropy exactly 1.5 drops out
    # (and 1.41 too): gated {2.0, 1.9}
    assert entropy_gate(ENTROPY, COMPLETION, 1.5).sum() == 2


def test_entropy_gate_per_row_tau_from_split_tau():
    # row 0 correct (tau 1.8 -> only 2.0), row 1 incorrect (tau 1.0 -> 1.3, 1.9, 1.41)
    tau = split_tau(torch.tensor([True, False]), tau_correct=1.8, tau_incorrect=1.0)
    torch.testing.assert_close(tau, torch.tensor([1.8, 1.0]))
    gate = entropy_gate(ENTROPY, COMPLETION, tau)
    expected = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(gate, expected)
    with pytest.raises(ValueError):
        entropy_gate(ENTROPY, COMPLETION, torch.tensor([1.0, 2.0, 3.0]))


def test_tau_for_fraction_exact_counts():
    # k = round(f * 8); tau = the (k+1)-th largest completion entropy
    # f = 0.25 -> k = 2 -> tau = 1.5 (3rd largest): gated {2.0, 1.9}
    tau = tau_for_fraction(ENTROPY, COMPLETION, 0.25)
    assert tau == pytest.approx(1.5)
    assert entropy_gate(ENTROPY, COMPLETION, tau).sum() == 2
    # f = 0.5 -> k = 4 -> tau = 1.3: gated {2.0, 1.9, 1.5, 1.41}
    assert tau_for_fraction(ENTROPY, COMPLETION, 0.5) == pytest.approx(1.3)
    # f = 0.3 -> 2.4 -> k = 2 ; f = 0.3125 -> 2.5 -> k = 3 (halves round up) -> tau = 1.41
    assert entropy_gate(ENTROPY, COMPLETION, tau_for_fraction(ENTROPY, COMPLETION, 0.3)).sum() == 2
    assert tau_for_fraction(ENTROPY, COMPLETION, 0.3125) == pytest.approx(1.41)
    # f = 0 -> nothing (tau = max = 2.0); f = 1 -> all 8 (tau just below min 0.0)
    assert entropy_gate(ENTROPY, COMPLETION, tau_for_fraction(ENTROPY, COMPLETION, 0.0)).sum() == 0
    tau1 = tau_for_fraction(ENTROPY, COMPLETION, 1.0)
    assert tau1 < 0.0 and entropy_gate(ENTROPY, COMPLETION, tau1).sum() == 8
    with pytest.raises(ValueError):
        tau_for_fraction(ENTROPY, COMPLETION, 1.5)
    with pytest.raises(ReasonMaxxerError):
        tau_for_fraction(ENTROPY, torch.zeros_like(COMPLETION), 0.1)


def test_tau_for_fraction_on_a_large_batch():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(16, 500, generator=g) * 3  # distinct values almost surely
    mask = torch.rand(16, 500, generator=g) < 0.7
    n = int(mask.sum())
    for f in (0.021, 0.052, 0.2):
        gate = entropy_gate(ent, mask, tau_for_fraction(ent, mask, f))
        assert int(gate.sum()) == count_for_fraction(n, f) == round(f * n)


def test_count_for_fraction_rounding():
    assert count_for_fraction(5, 0.5) == 3  # 2.5 rounds up
    assert count_for_fraction(8, 0.3) == 2  # 2.4
    assert count_for_fraction(1000, 0.052) == 52
    assert count_for_fraction(0, 0.5) == 0


def test_random_gate_exact_count_within_completion_and_seeded():
    # n = 8 completion tokens; fraction 0.25 -> exactly 2 positions, all inside the completion
    gate = random_gate(COMPLETION, 0.25, torch.Generator().manual_seed(1))
    assert gate.dtype == torch.bool and int(gate.sum()) == 2
    assert not (gate & ~COMPLETION).any()
    same = random_gate(COMPLETION, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(gate, same)
    assert int(random_gate(COMPLETION, 1.0, torch.Generator().manual_seed(2)).sum()) == 8
    assert int(random_gate(COMPLETION, 0.0, torch.Generator().manual_seed(2)).sum()) == 0


def test_random_gate_is_uniform_over_completion_positions():
    # 2000 draws of 2 out of 8 positions: each position is chosen w.p. 2/8 = 0.25
    g = torch.Generator().manual_seed(3)
    hits = sum(random_gate(COMPLETION, 0.25, g).float() for _ in range(2000))
    freq = hits[COMPLETION] / 2000
    assert torch.all((freq - 0.25).abs() < 0.04), freq
    assert hits[~COMPLETION].sum() == 0


def test_random_gate_matches_entropy_gate_fraction():
    gate = entropy_gate(ENTROPY, COMPLETION, 1.4)  # 4 of 8
    rnd = random_gate(COMPLETION, gated_fraction(gate, COMPLETION), torch.Generator().manual_seed(4))
    assert int(rnd.sum()) == 4


def test_random_gate_like_matches_per_row_counts():
    gate = entropy_gate(ENTROPY, COMPLETION, split_tau(torch.tensor([True, False]), 1.8, 1.0))  # rows: 1, 3
    rnd = random_gate_like(gate, COMPLETION, torch.Generator().manual_seed(5))
    assert rnd.sum(1).tolist() == [1, 3]
    assert not (rnd & ~COMPLETION).any()


def test_empty_gate_raises_with_actionable_message():
    gate = entropy_gate(ENTROPY, COMPLETION, 2.2)  # max completion entropy is 2.0
    assert not gate.any()
    with pytest.raises(ReasonMaxxerError, match=r"tau=2.2 .*largest completion entropy is 2 nats.*Lower tau"):
        check_gate_nonempty(gate, 2.2, max_entropy=2.0)
    check_gate_nonempty(entropy_gate(ENTROPY, COMPLETION, 1.4), 1.4)  # non-empty: no error


def test_gated_fraction_empty_completion_raises():
    with pytest.raises(ReasonMaxxerError):
        gated_fraction(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
