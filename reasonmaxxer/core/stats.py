"""core.stats: pass@k, confidence intervals, paired differences, ROC / AUROC."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ReasonMaxxerError

Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct.

    1 - C(n-c, k) / C(n, k) (Chen et al. 2021), computed as the product
    1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms large binomials.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if n < 1 or not 0 <= c <= n:
        raise ReasonMaxxerError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ReasonMaxxerError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}; sample more or use a smaller k")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, s / sqrt(k)) of k >= 1 values, s the sample standard deviation (ddof=1; 0 for one value)."""
    v = [float(x) for x in values]
    if not v:
        raise ReasonMaxxerError("cannot compute a mean over zero values")
    m = math.fsum(v) / len(v)
    if len(v) == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in v) / (len(v) - 1)) / math.sqrt(len(v))


def normal_mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and unclipped normal-approximation 95% interval (sample std, ddof=1)."""
    m, se = _mean_se(values)
    return m, m - Z95 * se, m + Z95 * se


# two-sided 95% quantiles of Student's t, t_{0.975}(df) for df = 1..30 (standard tables)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T95 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of a few replicates (k >= 2
    values, each one run's result, e.g. a difference in points): mean +- t_{0.975}(k-1) * s /
    sqrt(k), s the sample standard deviation (ddof=1); for k > 31 the quantile is the normal's
    Cornish-Fisher expansion to order 1/df^2 (within 1e-3 of the exact one). Fewer than 2
    values: an error (no spread to measure)."""
    if len(values) < 2:
        raise ReasonMaxxerError(f"a t interval needs at least 2 values, got {len(values)}")
    df, z = len(values) - 1, Z95
    t = T95[df - 1] if df <= len(T95) else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    m, se = _mean_se(values)
    return m, m - t * se, m + t * se


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) for per-problem scores in [0, 1].

    Normal approximation over problems: mean +- 1.96 * s / sqrt(n), with s the sample
    standard deviation (ddof=1), the bounds clipped to [0, 1]. One value -> (m, m, m).
    """
    m, lo, hi = normal_mean_ci(values)
    return m, max(0.0, lo), min(1.0, hi)


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval (low, high) for a proportion p in [0, 1] observed over n >= 1
    trials. p may be fractional (an avg@n accuracy over n problems); see `wilson_ci95` for counts."""
    z2 = Z95 * Z95
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def wilson_ci95(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval (low, high) for a binomial proportion successes/n."""
    successes, n = operator.index(successes), operator.index(n)
    if n < 1 or not 0 <= successes <= n:
        raise ReasonMaxxerError(f"wilson_ci95: need n >= 1 and 0 <= successes <= n, got {successes}/{n}")
    return wilson_interval(successes / n, n)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
    """Per-problem paired difference a - b over the problem ids both contain.

    E.g. a = trained per-problem avg@n, b = base per-problem avg@n on the same problems.
    Returns {"n", "mean_diff", "low", "high" (normal-approximation 95% interval over
    problems, not clipped), "wins" (a > b), "losses" (a < b), "ties", "only_in_a",
    "only_in_b"}.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ReasonMaxxerError(
            "paired_difference: the two results share no problem ids; evaluate both on the same problems"
        )
    diffs = [float(a[p]) - float(b[p]) for p in common]
    m, lo, hi = normal_mean_ci(diffs)
    return {
        "n": len(common),
        "mean_diff": m,
        "low": lo,
        "high": hi,
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "only_in_a": len(set(a) - set(b)),
        "only_in_b": len(set(b) - set(a)),
    }


def paired_bootstrap(
    a: Mapping[str, float], b: Mapping[str, float], *, n_boot: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Per-problem paired difference a - b with a 95% percentile bootstrap interval.

    Resamples the problems both contain (with replacement, `n_boot` times, numpy's seeded
    generator) and takes the 2.5% and 97.5% quantiles of the resampled mean difference. Same
    keys as `paired_difference` ("n", "mean_diff", "low", "high", "wins", "losses", "ties"),
    plus "n_boot". Use it where the normal approximation is doubtful (few problems, 0/1
    outcomes, skewed differences).
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ReasonMaxxerError(
            "paired_bootstrap: the two results share no problem ids; evaluate both on the same problems"
        )
    d = np.array([float(a[p]) - float(b[p]) for p in common])  # [n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))  # [n_boot, n]
    means = d[idx].mean(1)  # [n_boot]
    return {
        "n": len(d),
        "mean_diff": float(d.mean()),
        "low": float(np.quantile(means, 0.025)),
        "high": float(np.quantile(means, 0.975)),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "n_boot": n_boot,
    }


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of ``scores`` [N] (higher = more positive) for boolean ``labels`` [N]: (fpr [G+1],
    tpr [G+1], auroc), G the number of distinct scores; arrays, tensors or lists.

    NaN scores are dropped. A tie group is one threshold step (a diagonal segment), so a tied
    positive/negative pair counts 1/2. The AUROC is the Mann-Whitney U / (n_pos * n_neg),
    counted exactly in integers (equal to the trapezoid area under (fpr, tpr)). nan (and the
    diagonal) if a class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), math.nan
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]  # [G] cumulative counts
    pos_g, neg_g = np.diff(tp, prepend=0), np.diff(fp, prepend=0)  # [G] per group
    # 2U = sum over groups of negatives * (2 * positives ranked above + positives tied)
    twice_u = int(np.sum(neg_g * (2 * (tp - pos_g) + pos_g)))
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], twice_u / (2 * n_pos * n_neg)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` [N] for binary ``labels`` [N]; see `roc_curve`."""
    return roc_curve(scores, labels)[2]
