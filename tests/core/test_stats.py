"""core.stats: roc_curve / auroc (ties, NaN scores, empty classes), the paired bootstrap and the t interval, by hand."""

import math

import numpy as np
import pytest
import torch

from reasonmaxxer.core.stats import auroc, roc_curve
from reasonmaxxer.errors import ReasonMaxxerError


def test_auroc_with_ties_by_hand():
    # pos {0.4, 0.8}, neg {0.1, 0.4, 0.4}: pairs won 1 + .5 + .5 (for 0.4) + 3 (for 0.8) = 5 of 6
    s = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.4])
    y = torch.tensor([0, 1, 0, 1, 0])
    assert auroc(s, y) == 5 / 6
    assert auroc(-s, y) == 1 / 6
    assert auroc(torch.ones(4), torch.tensor([0, 1, 0, 1])) == 0.5
    assert math.isnan(auroc(s, torch.zeros(5)))
    assert math.isnan(auroc(s, torch.ones(5)))


def test_roc_curve_points_and_area_by_hand():
    # descending thresholds 0.8 | 0.4 (one tie group: 1 pos, 2 neg) | 0.1
    fpr, tpr, auc = roc_curve([0.1, 0.4, 0.4, 0.8, 0.4], [0, 1, 0, 1, 0])
    assert fpr.tolist() == [0.0, 0.0, 2 / 3, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert auc == pytest.approx(float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)))  # trapezoid
    # no ties: pairs (pos > neg) = 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool))[2] == 0.75


def test_roc_curve_drops_nan_scores():
    assert auroc([0.1, float("nan"), 0.9], [0, 1, 1]) == 1.0
    fpr, tpr, auc = roc_curve(np.ones(3), np.zeros(3, bool))
    assert math.isnan(auc) and fpr.tolist() == tpr.tolist() == [0.0, 1.0]


def test_paired_bootstrap_hand_values_and_interval():
    from reasonmaxxer.core.stats import paired_bootstrap, paired_difference

    a = {"p1": 1.0, "p2": 0.5, "p3": 0.0, "p4": 1.0, "x": 1.0}
    b = {"p1": 0.0, "p2": 0.5, "p3": 0.25, "p4": 0.0}
    r = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert r["n"] == 4 and r["mean_diff"] == pytest.approx((1 + 0 - 0.25 + 1) / 4)
    assert (r["wins"], r["losses"], r["ties"]) == (2, 1, 1)
    assert r["low"] < r["mean_diff"] < r["high"]
    assert -0.25 <= r["low"] and r["high"] <= 1.0  # a resampled mean lies between the extreme differences
    assert paired_bootstrap(a, b, n_boot=4000, seed=1) == r  # seeded
    # on many problems the bootstrap interval approaches the normal one
    g = np.random.default_rng(0)
    big_a = {str(i): float(g.random() < 0.6) for i in range(2000)}
    big_b = {str(i): float(g.random() < 0.5) for i in range(2000)}
    boot, norm = paired_bootstrap(big_a, big_b, seed=2), paired_difference(big_a, big_b)
    assert boot["low"] == pytest.approx(norm["low"], abs=0.006) and boot["high"] == pytest.approx(
        norm["high"], abs=0.006
    )


def test_t_interval_of_few_replicates_by_hand():
    from reasonmaxxer.core.stats import t_mean_ci95

    # [1, 2, 3]: mean 2, s = 1, t_0.975(2) = 4.303: half-width 4.303 / sqrt(3) = 2.4843
    m, lo, hi = t_mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(lo - (2 - 2.4843)) < 1e-4 and abs(hi - (2 + 2.4843)) < 1e-4
    # two values 0 and 2: mean 1, s = sqrt(2), t(1) = 12.706: half 12.706 * sqrt(2) / sqrt(2)
    assert t_mean_ci95([0.0, 2.0]) == pytest.approx((1.0, 1 - 12.706, 1 + 12.706))
    # 41 values (df 40, past the table): t_0.975(40) = 2.021; -1 / +1 alternating around 0 plus one 0
    v = [(-1.0) ** i for i in range(40)] + [0.0]
    s = (40 / 40) ** 0.5  # sum of squares 40 over df 40
    assert t_mean_ci95(v)[2] == pytest.approx(2.021 * s / 41**0.5, rel=1e-3)
    with pytest.raises(ReasonMaxxerError, match="at least 2"):
        t_mean_ci95([1.0])
