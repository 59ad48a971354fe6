"""Tests for reasonmaxxer.verify: a table of realistic model outputs, extraction edge cases,
adversarial inputs under grade_many's outer deadline, and pool/in-process agreement.

Expected reasons: "match" (correct), "mismatch", "no_answer" (nothing extracted).
"""

import time

import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.verify import (
    MAX_ANSWER_CHARS,
    TEST_SLEEP_MARKER,
    Grade,
    Verdict,
    extract_answer,
    grade,
    grade_many,
    last_boxed,
    parse_failures,
)

M, X, N = "match", "mismatch", "no_answer"

# (gold, completion, expected strict reason, expected lenient reason)
TABLE = [
    # --- GSM8K-style small-model outputs
    ("7", "Tom has 3 apples and buys 4 more. 3 + 4 = 7. The answer is 7.", M, M),
    ("7", "Tom has 3 apples. He buys 4 more, so he has 3 + 4 = 7 apples.\n\\boxed{7}", M, M),
    ("7", "Tom has 3 apples and buys 4 more. 3 + 4 = 8. The answer is 8.", X, X),
    ("7", "Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples in total.", N, M),
    ("5", "She had 12 cookies and ate 5, leaving 12 - 5 = 7 cookies.", N, X),  # last number is 7
    ("7", "Let me think about this problem step by step. First we need to", N, N),
    ("7", "", N, N),
    ("1,080", "He earns 18 * 60 = 1080 dollars per week. The answer is 1080.", M, M),
    ("1,080", "18 x 60 = 1,080\nSo the answer is $1,080.", M, M),
    ("1080", "Each week: 18 * 60 = 1,080 dollars.", N, M),
    (
        "18",
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day at $2 each, so she makes 9 * 2 = $18 every day.\nThe answer is $18.",
        M,
        M,
    ),
    ("18", "So she makes 9 * 2 = 18 dollars.\nThe answer is 18 dollars.", M, M),
    ("18", "She makes \\boxed{\\$18} every day.", M, M),
    ("3", "The first step gives 2 + 1 = 3 hours.\n#### 3", N, M),
    ("-4", "The temperature dropped from 6 to -4 degrees, a change of -10. The final answer is -4.", M, M),
    ("-4", "The temperature is now 6 - 10 = -4", N, M),
    ("0.5", "Half of the pizza is left, so the answer is $\\frac{1}{2}$.", M, M),
    ("\\frac{1}{2}", "The probability is 0.5. The answer is 0.5.", M, M),
    ("3/4", "She ate 1/4 of the cake, so 1 - 1/4 = 3/4 remains.", N, M),
    ("2.5", "He walks 10 km in 4 hours, so his speed is 10 / 4 = 2.5 km/h.", N, M),
    ("45", "The answer is: 45", M, M),
    ("45", "**The final answer is 45.**", M, M),
    ("12", "Therefore, the final answer is: $\\boxed{12}$. I hope it is correct.", M, M),
    # --- several boxes: the last one wins
    ("12", "First I thought \\boxed{10}, but I made an error. Recomputing gives \\boxed{12}.", M, M),
    ("10", "First I thought \\boxed{10}, but I made an error. Recomputing gives \\boxed{12}.", X, X),
    ("12", "\\boxed{12} ... wait, the answer is 14.", M, M),  # box beats a later "answer is"
    ("7", "The answer is \\boxed{\\boxed{7}}", M, M),
    ("7", "\\fbox{7}", M, M),
    # --- AIME / AMC
    ("025", "The remainder is 25, so the answer is \\boxed{25}.", M, M),
    ("25", "The answer is \\boxed{025}.", M, M),
    ("27.0", "The sum of the roots is \\boxed{27}.", M, M),
    ("27", "Thus the value is $\\boxed{27.0}$", M, M),
    ("112", "So m + n = 97 + 15 = 112, and the answer is $\\boxed{112}$.", M, M),
    ("\\text{(C)}", "Comparing the options, the answer is \\boxed{\\text{(C)}}", M, M),
    # --- MATH LaTeX
    ("\\frac{\\pi}{2}", "So $\\theta = \\boxed{\\dfrac{\\pi}{2}}$.", M, M),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "In polar coordinates the point is $\\boxed{(3,\\frac{\\pi}{2})}$.", M, M),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "In polar coordinates the point is $\\boxed{(3, \\pi)}$.", X, X),
    ("2\\sqrt{3}", "The side length is $\\sqrt{12} = \\boxed{2\\sqrt{3}}$.", M, M),
    ("2\\sqrt{3}", "The side length is $\\boxed{\\sqrt{12}}$.", M, M),
    ("2\\sqrt{3}", "The side length is $\\boxed{3\\sqrt{2}}$.", X, X),
    ("[2, 5)", "The solution set is $x \\in \\boxed{[2,5)}$.", M, M),
    ("[2, 5)", "The solution set is $\\boxed{(2, 5)}$.", X, X),
    ("(-\\infty, 3]", "Therefore the domain is $\\boxed{(-\\infty,3]}$.", M, M),
    ("\\frac{\\sqrt{3}}{2}", "We get $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt3}{2}}$.", M, M),
    ("10", "The number of diagonals is $\\frac{5(5-3)}{2} = 5$, so the answer is $\\boxed{5}$.", X, X),
    ("x^2 + 2x + 1", "Expanding, $(x+1)^2 = \\boxed{x^2+2x+1}$.", M, M),
    ("90^\\circ", "The angle is $\\boxed{90^\\circ}$.", M, M),
    ("90^\\circ", "The angle is $\\boxed{90}$ degrees.", M, M),
    ("5", "The area is $\\boxed{5 \\text{ cm}^2}$.", M, M),
    ("\\frac{1}{2}", "The answer is $\\frac{1}{2}$", M, M),  # no final period
    ("\\frac{3}{4}", "The probability is $\\frac{3}{4}$, as computed above.", N, M),
    # --- OlympiadBench-style multiple answers
    ("3, 5", "The solutions are $x = 3$ and $x = 5$, so $\\boxed{3, 5}$.", M, M),
    ("3, 5", "Both roots work: $\\boxed{5, 3}$", M, M),
    ("3, 5", "The roots are $\\boxed{x = 3, x = 5}$.", M, M),
    ("3, 5", "Only $\\boxed{3}$ satisfies the condition.", X, X),
    ("-2, 1", "The answer is -2, 1.", M, M),
    # --- last number is not the answer
    ("6", "There are 6 ways to choose, and we checked 3 cases.", N, X),
    ("4", "The answer is four.", X, X),  # an "answer is" with a word: strict takes it and it fails
    ("12", "In 2023 she was 12. In 2024 she turned 13.", N, X),
]


def _ids():
    return [f"{i:02d}-{g[:10]}" for i, (g, *_rest) in enumerate(TABLE)]


@pytest.mark.parametrize("gold,completion,exp_strict,exp_lenient", TABLE, ids=_ids())
def test_table_in_process(gold, completion, exp_strict, exp_lenient):
    g = grade(gold, completion)
    assert (g.strict.reason, g.lenient.reason) == (exp_strict, exp_lenient), g
    assert g.strict.correct == (exp_strict == M) and g.lenient.correct == (exp_lenient == M)
    assert (g.strict.extracted is None) == (exp_strict == N)
    assert (g.lenient.extracted is None) == (exp_lenient == N)
    if g.strict.extracted is not None:  # lenient only adds a fallback
        assert g.lenient == g.strict


def test_pool_agrees_with_in_process():
    golds = [row[0] for row in TABLE]
    comps = [row[1] for row in TABLE]
    assert grade_many(golds, comps, workers=2, timeout_s=20) == grade_many(golds, comps, workers=0)


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion,mode,expected",
    [
        ("so \\boxed{\\frac{1}{2}} is it", "strict", ("\\frac{1}{2}", "boxed")),
        ("\\boxed{\\{1, 2\\}}", "strict", ("\\{1, 2\\}", "boxed")),  # escaped braces do not count
        ("\\boxed{7} then \\boxed{ and the text got cut", "strict", ("7", "boxed")),  # unclosed skipped
        ("\\boxed{} \\boxed{ }", "lenient", (None, None)),
        ("The final answer is $-3.5$.\nDone", "strict", ("-3.5", "answer_is")),
        ("the answer is 7, because 3 + 4 = 7", "strict", ("7", "answer_is")),
        ("the answer is \\(x+1\\).", "strict", ("x+1", "answer_is")),
        ("The answer is 3.14 and more", "strict", ("3.14 and more", "answer_is")),
        ("no answer, 12,345 then 6", "lenient", ("6", "last_number")),
        ("total is 1,234,567.", "lenient", ("1,234,567", "last_number")),
        ("10-5 and then", "lenient", ("5", "last_number")),
        ("x = -5", "lenient", ("-5", "last_number")),
        ("ratio 3/4", "lenient", ("3/4", "last_number")),
        ("so $\\frac{3}{4}$", "lenient", ("\\frac{3}{4}", "last_number")),
        ("x2 y", "lenient", (None, None)),
        ("no digits here", "strict", (None, None)),
    ],
)
def test_extract_answer(completion, mode, expected):
    assert extract_answer(completion, mode) == expected


def test_bad_arguments_raise_reasonmaxxer_error():
    with pytest.raises(ReasonMaxxerError):
        extract_answer("x", mode="fuzzy")
    with pytest.raises(ReasonMaxxerError):
        grade_many(["1"], ["1", "2"], workers=0)
    with pytest.raises(ReasonMaxxerError):
        grade_many(["1"], ["1"], workers=0, timeout_s=0)
    with pytest.raises(ReasonMaxxerError):
        grade_many(["1"], [None], workers=0)
    with pytest.raises(ReasonMaxxerError):
        grade_many(["1"], ["1"], workers=-1)


def test_grade_refuses_non_main_thread():
    import threading

    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(ReasonMaxxerError, grade, "1", "\\boxed{1}")))
    t.start()
    t.join()
    assert len(errors) == 1


def test_parse_failures_and_empty():
    grades = grade_many(["1", "2", "3"], ["\\boxed{1}", "about 2", "nothing"], workers=0)
    assert parse_failures(grades) == {"strict": 2, "lenient": 1}
    assert grade_many([], [], workers=2) == []


def test_too_long_answer_is_an_error_not_a_silent_zero():
    g = grade("1", "\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}")
    assert g.strict.reason.startswith("error: answer too long") and not g.strict.correct
    assert g.strict.extracted.endswith("…") and len(g.strict.extracted) == MAX_ANSWER_CHARS + 1


def test_extraction_is_linear_on_megabyte_inputs():
    t0 = time.monotonic()
    for text in ["\\boxed{" * 300_000, "{" * 1_000_000 + "\\boxed{7}", "answer is " * 100_000, "1, " * 400_000]:
        extract_answer(text, "lenient")
    assert time.monotonic() - t0 < 5.0


# ----------------------------------------------------------------------------- deadlines


def test_adversarial_inputs_return_within_deadline():
    nested = "1"
    for _ in range(500):
        nested = "\\frac{" + nested + "}{2}"
    cases = [
        ("7", "x " * 1_000_000 + "The answer is 7.", M),  # 2 MB string
        ("1", "\\boxed{" + nested + "}", "error: answer too long"),  # depth-500 \frac
        ("1", "\\boxed{\\frac{" * 40 + "1" + "}{2}" * 40 + "}", X),  # depth 40 fits the cap
        ("1", "The result is \\boxed{" + "7 " * 1000, N),  # unclosed box
        ("1", "9" * 1_000_000, N),  # 10^6 digits: strict finds nothing
        ("1", "\\boxed{9^{9^{9^{9}}}}", "timeout"),  # sympy cannot evaluate this
        ("2", "\\boxed{2}", M),
    ]
    t0 = time.monotonic()
    grades = grade_many([c[0] for c in cases], [c[1] for c in cases], workers=2, timeout_s=2.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 15.0, elapsed
    for (_, completion, expected), g in zip(cases, grades):
        assert g.strict.reason.startswith(expected), (completion[:40], g.strict)
    assert grades[4].lenient.reason.startswith("error: answer too long")  # lenient takes the digits
    assert grades[5].lenient.reason == "timeout" and grades[5].strict.extracted == "9^{9^{9^{9}}}"


def test_stuck_worker_is_killed_and_later_items_are_graded():
    golds = ["1"] * 12
    comps = ["\\boxed{1}"] * 12
    comps[1] = TEST_SLEEP_MARKER + "60"  # sleeps 60 s ignoring signals; only the outer deadline stops it
    comps[7] = TEST_SLEEP_MARKER + "60"
    t0 = time.monotonic()
    grades = grade_many(golds, comps, workers=1, timeout_s=1.0)
    assert time.monotonic() - t0 < 10.0
    for i, g in enumerate(grades):
        if i in (1, 7):
            assert g.strict == Verdict(False, None, None, "timeout")
            assert g.lenient.reason == "timeout" and not g.lenient.correct
        else:
            assert g == Grade(Verdict(True, "1", "boxed", M), Verdict(True, "1", "boxed", M))


def test_crashing_worker_is_replaced_and_the_item_reported():
    golds = ["1"] * 6
    comps = ["\\boxed{1}"] * 6
    comps[2] = TEST_SLEEP_MARKER + "exit"  # the worker process exits mid-item, every time
    grades = grade_many(golds, comps, workers=2, timeout_s=5.0)
    assert grades[2].strict.reason == grades[2].lenient.reason == "error: worker died (exit code 3)"
    assert all(g.strict.correct for i, g in enumerate(grades) if i != 2)


# The one \boxed parser, shared by grading and benchmark loading (data.benchmarks).
LAST_BOXED = [
    (r"a \boxed{1} then \boxed{\frac{a}{b}}.", r"\frac{a}{b}"),  # two boxes: the last
    (r"\boxed {x^{2}}", "x^{2}"),  # space before the brace, nested braces
    (r"\fbox{3}", "3"),
    (r"\boxed{ 7 }", "7"),  # stripped
    ("no box", None),
    (r"\boxed 5", None),  # no brace: not a box
    (r"\boxed{unclosed {", None),  # unbalanced
    (r"\boxed{1} and \boxed{2", "1"),  # the last box never closes: the earlier one
    (r"\boxed{\boxed{1}}", r"\boxed{1}"),  # nested boxes: the outer one closes last
    (r"\boxed{}", None),  # empty boxes are skipped
    (r"\boxed{2} \boxed{  }", "2"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are literal
    (r"\boxed{a\}", None),
    (r"\boxed{\left\{ 1 \right.}", r"\left\{ 1 \right."),
    (r"{\boxed{3}", "3"),
    (r"\boxed{1}}", "1"),
]


@pytest.mark.parametrize("text,expected", LAST_BOXED)
def test_last_boxed_table(text, expected):
    assert last_boxed(text) == expected
