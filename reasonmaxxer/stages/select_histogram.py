"""The pass-rate histogram of a selection (`select`'s stats and its printed summary)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ReasonMaxxerError


def pass_rate_histogram(stats: Sequence, bins: int = 10) -> list[int]:
    """Counts of problems (`select.ProblemStats`: n, n_correct) per pass-rate bin: ``bins`` equal bins over [0, 1].

    Bin k holds pass rates in [k/bins, (k+1)/bins); the last bin also holds 1.0. The bin
    is computed exactly from (n_correct, n), so 3/10 lands in bin 3. Problems with n == 0
    are not counted.
    """
    if bins < 1:
        raise ReasonMaxxerError(f"pass_rate_histogram: bins must be >= 1, got {bins}")
    hist = [0] * bins
    for s in stats:
        if s.n > 0:
            hist[min(bins - 1, (s.n_correct * bins) // s.n)] += 1
    return hist


def format_histogram(hist: Sequence[int], width: int = 30) -> str:
    """A text histogram, one line per bin over [0, 1], bars scaled to at most ``width`` '#'.

    Example line: ``  [0.2, 0.3)  ########             4``.
    """
    bins = len(hist)
    if bins == 0:
        return "  (empty histogram)"
    top = max(hist)
    lines = []
    for k, count in enumerate(hist):
        lo, hi = k / bins, (k + 1) / bins
        label = f"[{lo:.1f}, {hi:.1f}{']' if k == bins - 1 else ')'}"
        bar = "#" * (math.ceil(count * width / top) if top else 0)
        lines.append(f"  {label}  {bar:<{width}} {count}")
    return "\n".join(lines)
