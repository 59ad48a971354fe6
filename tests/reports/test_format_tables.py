"""Tests for reports.format, reports.tables, reports.render and the report's Wilson interval."""

import math

import numpy as np
import pytest

from reasonmaxxer.core.stats import wilson_ci95, wilson_interval
from reasonmaxxer.reports.format import fmt_number, fmt_pct, fmt_prob, fmt_value, visible_whitespace
from reasonmaxxer.reports.render import environment, script_json
from reasonmaxxer.reports.tables import Link, Raw, Table


def test_fmt_number_and_pct():
    assert fmt_number(1.4) == "1.4" and fmt_number(149) == "149" and fmt_number(np.int64(7)) == "7"
    assert fmt_number(0.123456, 3) == "0.123" and fmt_number(None) == "—" and fmt_number("x") == "x"
    assert fmt_number(math.nan, 3, missing="n/a") == "n/a" and fmt_number(True) == "True"
    assert fmt_pct(0.052) == "5.20%" and fmt_pct(5.2, fraction=False) == "5.20%"
    assert fmt_pct(None) == "—" and fmt_pct(math.inf, fraction=False, missing="n/a") == "n/a"
    assert fmt_prob(0.0004) == "4.0e-04" and fmt_prob(0) == "0.000" and fmt_prob(None) == "?"
    assert fmt_value({"r": 1}) == '{"r": 1}' and len(fmt_value(list(range(200)))) == 300
    assert visible_whitespace(" a\n\t\r") == "␣a↵⇥␍" and visible_whitespace("") == "∅"


def test_table_markdown_and_html():
    t = Table(["k|", "v"], [["a<b", Link("x y", "d/x y.txt")], [Raw("**r**"), Link("w", "https://e.org")]], "lr")
    assert t.markdown() == [
        "| k\\| | v |",
        "| --- | ---: |",
        "| a&lt;b | [x y](d/x%20y.txt) |",
        "| **r** | w |",
    ]
    html = environment().from_string('{% from "macros.html.j2" import table %}{{ table(t) }}').render(t=t)
    assert html == (
        '<table><thead><tr><th>k|</th><th>v</th></tr></thead><tbody><tr><td>a&lt;b</td><td class="r">'
        '<a href="d/x y.txt">x y</a></td></tr><tr><td>**r**</td><td class="r">w</td></tr></tbody></table>'
    )


def test_templates_autoescape_and_script_json():
    assert environment().from_string("{{ x }}").render(x="<script>") == "&lt;script&gt;"
    s = str(script_json({"t": "</script><!--&\u2028"}))
    assert "</" not in s and "<!--" not in s and "&" not in s and "\\u003c/script\\u003e" in s


@pytest.mark.parametrize("n", [1, 2, 7, 40, 500])
def test_wilson_interval_is_core_wilson_ci95_at_integer_counts(n):
    # the report's interval takes fractional proportions (avg@n); at p = k/n it is bit-identical to core's
    for k in range(0, n + 1, max(1, n // 25)):
        assert wilson_interval(k / n, n) == wilson_ci95(k, n)


def test_wilson_interval_fractional():
    # the avg@16 whisker of the report fixture's base model (0.2871 over 500 problems)
    assert wilson_interval(0.2871, 500) == pytest.approx((0.2491867075, 0.3282597366), abs=1e-10)
    assert wilson_interval(0.0, 10)[0] == 0.0 and wilson_interval(1.0, 10)[1] == pytest.approx(1.0)
