"""Number, percent, duration and token-text formatting shared by the reports (plain text, not escaped).

One meaning per name:
  as_float(x)      x as a float, or None when missing / not a number (bools are not numbers here)
  fmt_number(x)    a number to `digits` significant digits; `missing` when None or not finite
  fmt_pct(x)       a percentage with 2 decimals ('5.20%'); `fraction=True` when x is a fraction (0.052),
                   False when x is already in percent (5.2)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

MISSING = "—"


def as_float(x: Any) -> float | None:
    """x as a float, or None when it is missing / not a number (bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    return float(x)


def fmt_number(x: Any, digits: int = 4, *, missing: str = MISSING) -> str:
    """A number to `digits` significant digits ('1.4', '0.0001', '149'); integers in full;
    `missing` for None or a non-finite float; anything else that is not a number as str(x)."""
    v = as_float(x)
    if v is None:
        return missing if x is None else str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if not math.isfinite(v):
        return missing
    return f"{v:.{digits}g}"


def fmt_pct(x: Any, *, fraction: bool = True, missing: str = MISSING) -> str:
    """A percentage with two decimals: fmt_pct(0.052) == fmt_pct(5.2, fraction=False) == '5.20%';
    `missing` when x is not a finite number."""
    v = as_float(x)
    if v is None or not math.isfinite(v):
        return missing
    return f"{100 * v if fraction else v:.2f}%"


def fmt_acc(x: Any) -> str:
    """An accuracy in [0, 1] to 3 decimals ('0.298')."""
    v = as_float(x)
    return MISSING if v is None else f"{v:.3f}"


def fmt_signed(x: Any) -> str:
    """A difference with its sign, 3 decimals ('+0.204')."""
    v = as_float(x)
    return MISSING if v is None else f"{v:+.3f}"


def fmt_prob(p: Any) -> str:
    """A probability: 3 decimals, or 1-digit scientific below 0.001 ('?' when missing)."""
    v = as_float(p)
    if v is None:
        return "?"
    return f"{v:.3f}" if v >= 0.001 or v == 0 else f"{v:.1e}"


def fmt_duration(s: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def fmt_value(x: Any) -> str:
    """A summary/selection value as one line of text (dicts and lists as JSON, cut at 300 chars)."""
    if isinstance(x, (Mapping, list, tuple)):
        s = json.dumps(x, default=str, ensure_ascii=False)
        return s if len(s) <= 300 else s[:297] + "..."
    return fmt_number(x)


_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def visible_whitespace(text: str) -> str:
    """Token text with whitespace made visible ('␣the', '↵↵'); '∅' for the empty string."""
    return text.translate(_VISIBLE) if text else "∅"
