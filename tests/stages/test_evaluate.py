"""Tests for reasonmaxxer.evaluate: estimators against brute force, a hand-worked report."""

import itertools
import json
import math
import os
import types

import pytest
import torch

from reasonmaxxer.core.stats import mean_ci95, paired_difference, pass_at_k, wilson_ci95
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.evaluate import EvalReport, evaluate, maj_at_k, normalize_answer, save_report, to_markdown

Z = 1.959963984540054
approx = pytest.approx


# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k) - brute) < 1e-12, (n, c, k)


def test_pass_at_k_large_n_is_stable_and_errors():
    # 1 - C(900, 10) / C(1000, 10) would overflow a float if formed directly from binomials.
    exact = 1 - math.comb(900, 10) / math.comb(1000, 10)
    assert pass_at_k(1000, 100, 10) == approx(exact, abs=1e-12)
    for bad in [(4, 1, 5), (4, 1, 0), (4, 5, 1), (0, 0, 1)]:
        with pytest.raises(ReasonMaxxerError):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------- maj@k


@pytest.mark.parametrize(
    "raw, norm",
    [
        (" 12 ", "12"),
        ("$12$", "12"),
        ("12.0", "12"),
        ("-3.00", "-3"),
        ("12.5", "12.5"),
        ("1,000", "1000"),
        ("(1,2)", "(1,2)"),
        ("5.", "5"),
        ("x = 3", "x=3"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("10\\,000", "10000"),
        ("  $ $ ", None),
        (None, None),
        ("1/2", "1/2"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_maj_at_k_hand_examples():
    # Plain majority: "5" x2 beats "3" x1; the first "5" is correct.
    assert maj_at_k(["5", "3", "5"], [True, False, True], 3) == 1.0
    # Only the first k count: first 2 are "3", "5" -> tie -> "3" (first occurrence), wrong.
    assert maj_at_k(["3", "5", "5"], [False, True, True], 2) == 0.0
    assert maj_at_k(["3", "5", "5"], [False, True, True], 3) == 1.0
    # Tie broken by first occurrence even when the later answer is correct.
    assert maj_at_k(["4", "7", "7", "4"], [False, True, True, False], 4) == 0.0
    assert maj_at_k(["7", "4", "4", "7"], [True, False, False, True], 4) == 1.0
    # None is no vote: one "9" beats three Nones.
    assert maj_at_k([None, None, "9", None], [False, False, True, False], 4) == 1.0
    # No votes at all -> 0.
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    # Normalisation merges "7.0", "$7$", " 7" into one vote of 3 against "4" x2.
    assert maj_at_k(["4", "7.0", "4", "$7$", " 7"], [False, True, False, True, True], 5) == 1.0
    # Without normalisation "4" would be the plurality; with it "1000" has 2 votes.
    assert maj_at_k(["4", "1,000", "1000"], [False, True, True], 3) == 1.0
    with pytest.raises(ReasonMaxxerError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ReasonMaxxerError):
        maj_at_k(["1"], [True], 2)


# ----------------------------------------------------------------------------- intervals


def test_mean_ci95_and_wilson():
    # values .2, .4, .6: mean .4, sample var ((.2)^2 + 0 + (.2)^2) / 2 = .04, sd .2, se .2/sqrt(3)
    m, lo, hi = mean_ci95([0.2, 0.4, 0.6])
    half = Z * 0.2 / math.sqrt(3)  # = 0.22632
    assert (m, lo, hi) == approx((0.4, 0.4 - half, 0.4 + half))
    assert mean_ci95([0.7]) == (0.7, 0.7, 0.7)
    assert mean_ci95([1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert mean_ci95([0.0, 1.0]) == (0.5, 0.0, 1.0)  # clipped
    with pytest.raises(ReasonMaxxerError):
        mean_ci95([])
    # Wilson 0/10: center = (z^2/20) / (1 + z^2/10), half the same -> low 0, high = (z^2/10)/(1 + z^2/10)
    z2 = Z * Z
    assert wilson_ci95(0, 10) == approx((0.0, (z2 / 10) / (1 + z2 / 10)))  # (0, 0.2775)
    lo, hi = wilson_ci95(5, 10)
    assert (lo + hi) / 2 == approx(0.5) and lo == approx(0.2366, abs=1e-4)
    with pytest.raises(ReasonMaxxerError):
        wilson_ci95(1, 0)


def test_paired_difference_hand_example():
    a = {"p1": 1.0, "p2": 0.5, "p3": 0.25, "only_a": 1.0}
    b = {"p1": 0.5, "p2": 0.5, "p3": 0.75, "only_b": 0.0}
    d = paired_difference(a, b)
    # diffs over p1, p2, p3: +.5, 0, -.5 -> mean 0; sample var (.25 + 0 + .25)/2 = .25, sd .5
    half = Z * 0.5 / math.sqrt(3)  # = 0.56579
    assert d == {
        "n": 3,
        "mean_diff": 0.0,
        "low": approx(-half),
        "high": approx(half),
        "wins": 1,
        "losses": 1,
        "ties": 1,
        "only_in_a": 1,
        "only_in_b": 1,
    }
    with pytest.raises(ReasonMaxxerError):
        paired_difference({"x": 1.0}, {"y": 1.0})


# ----------------------------------------------------------------------------- evaluate()


def _row(pid, i, s_ans, s_ok, l_ans, l_ok, truncated=False):
    return dict(
        problem_id=pid,
        sample_index=i,
        strict_extracted=s_ans,
        strict_correct=s_ok,
        lenient_extracted=l_ans,
        lenient_correct=l_ok,
        truncated=truncated,
    )


# p1 (gold 5, tier word1), p2 (gold 7, word1), p3 (gold 12, word2); 4 samples each.
ROWS = [
    _row("p1", 0, "5", True, "5", True),
    _row("p1", 1, None, False, "5", True),
    _row("p1", 2, "3", False, "3", False),
    _row("p1", 3, "5", True, "5", True),
    _row("p2", 0, "4", False, "4", False),
    _row("p2", 1, "7", True, "7", True),
    _row("p2", 2, "9", False, "9", False),
    _row("p2", 3, None, False, "7.0", True, truncated=True),
    _row("p3", 0, "12", True, "12", True),
    _row("p3", 1, "12", True, "12", True),
    _row("p3", 2, "$12$", True, "12", True),
    _row("p3", 3, "12", True, "12", True),
]
META = {"p1": {"tier": "word1"}, "p2": {"tier": "word1"}, "p3": {"tier": "word2"}}
GREEDY = [
    {"problem_id": "p1", "strict_correct": True, "lenient_correct": True},
    {"problem_id": "p2", "strict_correct": False, "lenient_correct": True},
    {"problem_id": "p3", "strict_correct": True, "lenient_correct": True},
]


def _ci(values):
    """The same normal-approximation interval, written out: mean +- z * s / sqrt(n), clipped."""
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return (m, max(0.0, m - Z * s / math.sqrt(n)), min(1.0, m + Z * s / math.sqrt(n)))


def _est(e):
    return (e.value, e.low, e.high)


@pytest.fixture(scope="module")
def report():
    # Rows reversed: evaluate() must order samples by sample_index itself (maj@k uses the first k).
    return evaluate(ROWS[::-1], META, ks=(1, 2, 4, 8), greedy_rows=GREEDY, label="hand")


def test_evaluate_counts_and_rates(report):
    assert (report.label, report.n_problems, report.n_samples) == ("hand", 3, 12)
    assert (report.min_samples, report.max_samples) == (4, 4)
    assert report.ks == (1, 2, 4)  # 8 > 4 samples -> skipped for the whole report
    assert len(report.notes) == 1 and "k=8 skipped" in report.notes[0] and "3 problem(s)" in report.notes[0]
    # strict None at p1 s1 and p2 s3 -> 2/12; lenient extracts everything -> 0
    assert report.strict.parse_failure_rate == approx(2 / 12)
    assert report.lenient.parse_failure_rate == 0.0
    assert report.truncation_rate == approx(1 / 12)  # p2 s3


def test_evaluate_avg_at_n(report):
    # strict correct counts: p1 2/4, p2 1/4, p3 4/4 -> (.5 + .25 + 1)/3 = 0.58333
    # mean .58333; deviations -.0833, -.3333, .4167; sum sq .29167; var .14583; sd .38188;
    # se .22048; half 1.96 * .22048 = .43213 -> [.15120, 1.01546 -> clipped 1.0]
    assert _est(report.strict.avg_at_n) == approx(_ci([0.5, 0.25, 1.0]))
    assert _est(report.strict.avg_at_n) == approx((0.583333, 0.151202, 1.0), abs=1e-5)
    # lenient: p1 3/4, p2 2/4 ("7.0" graded correct), p3 4/4 -> (.75 + .5 + 1)/3 = 0.75
    # deviations 0, -.25, .25; var .0625; sd .25; se .14434; half .28290 -> [.46710, 1.0]
    assert _est(report.lenient.avg_at_n) == approx((0.75, 0.467104, 1.0), abs=1e-5)
    assert report.strict.avg_at_n.n == 3


def test_evaluate_pass_at_k(report):
    assert set(report.strict.pass_at_k) == {2, 4}  # pass@1 is avg@n
    # pass@2 = 1 - C(n-c,2)/C(4,2), C(4,2) = 6
    # strict: p1 c=2: 1 - 1/6 = 5/6; p2 c=1: 1 - 3/6 = 1/2; p3 c=4: 1 -> mean 7/9
    assert _est(report.strict.pass_at_k[2]) == approx(_ci([5 / 6, 1 / 2, 1.0]))
    assert report.strict.pass_at_k[2].value == approx(7 / 9)
    # lenient: p1 c=3: 1 - 0/6 = 1; p2 c=2: 1 - 1/6 = 5/6; p3: 1 -> mean 17/18
    assert _est(report.lenient.pass_at_k[2]) == approx(_ci([1.0, 5 / 6, 1.0]))
    assert report.lenient.pass_at_k[2].value == approx(17 / 18)
    # pass@4 with n=4: 1 whenever c >= 1; every problem has c >= 1 -> 1, zero-width interval
    assert _est(report.strict.pass_at_k[4]) == (1.0, 1.0, 1.0)
    assert _est(report.lenient.pass_at_k[4]) == (1.0, 1.0, 1.0)


def test_evaluate_maj_at_k(report):
    # maj@1 = first sample: p1 "5" ok, p2 "4" wrong, p3 "12" ok -> 1, 0, 1 (both modes)
    # values 1,0,1: mean 2/3, var (1/9 + 4/9 + 1/9)/2 = 1/3, se sqrt(1/3)/sqrt(3) = 1/3,
    # half 1.96/3 = .65332 -> [.01335, 1.0]
    assert _est(report.strict.maj_at_k[1]) == approx((2 / 3, 2 / 3 - Z / 3, 1.0))
    assert _est(report.lenient.maj_at_k[1]) == approx((2 / 3, 2 / 3 - Z / 3, 1.0))
    # maj@2: p1 strict ["5", None] -> "5" ok; p2 ["4", "7"] tie -> "4" wrong; p3 ok -> 2/3
    assert report.strict.maj_at_k[2].value == approx(2 / 3)
    assert report.lenient.maj_at_k[2].value == approx(2 / 3)
    # maj@4 strict: p1 ["5",None,"3","5"] -> "5" ok; p2 ["4","7","9",None] 3-way tie -> "4" wrong;
    #   p3 ["12","12","$12$"->"12","12"] ok -> 2/3
    assert report.strict.maj_at_k[4].value == approx(2 / 3)
    # maj@4 lenient: p2 ["4","7","9","7.0"->"7"] -> "7" (2 votes) ok; p1, p3 ok -> 1
    assert _est(report.lenient.maj_at_k[4]) == (1.0, 1.0, 1.0)


def test_evaluate_greedy(report):
    # strict greedy 2/3. Wilson: z^2 = 3.84146, z^2/n = 1.28049, denom 2.28049;
    # center (2/3 + z^2/6) / denom = (.66667 + .64024)/2.28049 = .57308;
    # half z * sqrt((2/3)(1/3)/3 + z^2/36) / denom = 1.96 * sqrt(.07407 + .10671)/2.28049 = .36542
    g = report.strict.greedy
    assert (g.value, g.n) == (approx(2 / 3), 3)
    assert (g.low, g.high) == approx((0.57308 - 0.36542, 0.57308 + 0.36542), abs=1e-4)
    # lenient greedy 3/3: center (1 + .64024)/2.28049 = .71925, half 1.96*sqrt(.10671)/2.28049 = .28075
    g = report.lenient.greedy
    assert (g.value, g.low, g.high) == approx((1.0, 0.71925 - 0.28075, 1.0), abs=1e-4)


def test_evaluate_breakdown_by_tier(report):
    assert list(report.breakdown) == ["tier"]
    w1, w2 = report.breakdown["tier"]
    # word1 = p1, p2: strict (.5 + .25)/2 = .375, lenient (.75 + .5)/2 = .625
    assert (w1.value, w1.n_problems, w1.n_samples) == ("word1", 2, 8)
    assert (w1.strict_avg_at_n, w1.lenient_avg_at_n) == approx((0.375, 0.625))
    # word2 = p3: 1, 1
    assert (w2.value, w2.n_problems, w2.n_samples, w2.strict_avg_at_n, w2.lenient_avg_at_n) == ("word2", 1, 4, 1.0, 1.0)


def test_breakdown_orders_levels_numerically_and_collects_missing():
    rows = [_row(p, 0, "1", ok, "1", ok) for p, ok in [("a", True), ("b", False), ("c", True), ("d", False)]]
    meta = {"a": {"level": 10, "source": "math500"}, "b": {"level": 2, "source": "math500"}, "c": {"level": 2}}
    r = evaluate(rows, meta, ks=(1,))
    assert list(r.breakdown) == ["level", "source"]
    assert [(g.value, g.n_problems, g.strict_avg_at_n) for g in r.breakdown["level"]] == [
        ("2", 2, 0.5),
        ("10", 1, 1.0),
        ("(missing)", 1, 0.0),
    ]  # b, c | a | d
    assert [(g.value, g.n_problems) for g in r.breakdown["source"]] == [("math500", 2), ("(missing)", 2)]
    assert evaluate(rows, None, ks=(1,)).breakdown == {}


def test_evaluate_unequal_sample_counts():
    rows = ROWS[:4] + [_row("p4", 0, "2", True, "2", True), _row("p4", 1, "2", True, "2", True)]
    r = evaluate(rows, ks=(1, 2, 4))
    assert (r.n_problems, r.n_samples, r.min_samples, r.max_samples) == (2, 6, 2, 4)
    assert r.ks == (1, 2) and "k=4 skipped: 1 problem(s) have fewer than 4 samples (fewest: 2)" in r.notes
    # avg@n weighs problems equally: strict p1 2/4, p4 2/2 -> .75 (pooled over samples would be 4/6)
    assert r.strict.avg_at_n.value == approx(0.75)
    # pass@2 with each problem's own n: p1 1 - C(2,2)/C(4,2) = 5/6; p4 n=2, c=2 -> 1; mean 11/12
    assert r.strict.pass_at_k[2].value == approx(11 / 12)
    # maj@2: p1 ["5", None] -> ok; p4 ["2", "2"] -> ok
    assert r.strict.maj_at_k[2].value == 1.0


def test_evaluate_errors():
    with pytest.raises(ReasonMaxxerError, match="no rollouts to evaluate"):
        evaluate([])
    with pytest.raises(ReasonMaxxerError, match="duplicate rollout"):
        evaluate([ROWS[0], ROWS[0]])
    bad = dict(ROWS[0])
    del bad["truncated"]
    with pytest.raises(ReasonMaxxerError, match="row 0: missing field.*truncated"):
        evaluate([bad])
    with pytest.raises(ReasonMaxxerError, match="more than once"):
        evaluate(ROWS, greedy_rows=GREEDY + GREEDY[:1])
    with pytest.raises(ReasonMaxxerError, match="ks must be positive"):
        evaluate(ROWS, ks=(0, 1))


def test_markdown_contains_the_numbers(report):
    md = to_markdown(report)
    assert "## Evaluation: hand" in md
    assert "3 problems, 12 samples (4 per problem), truncated 8.3%" in md
    assert "| pass@1 (avg@n) | 0.583 [0.151, 1.000] | 0.750 [0.467, 1.000] |" in md
    assert "| pass@2 | 0.778 [" in md and "| 0.944 [" in md
    assert "| maj@4 | 0.667 [0.013, 1.000] | 1.000 [1.000, 1.000] |" in md
    assert "| greedy (n=3) | 0.667 [0.208, 0.939] | 1.000 [0.439, 1.000] |" in md
    assert "| parse failures | 16.7% | 0.0% |" in md
    assert "| word1 | 2 | 0.375 | 0.625 |" in md and "| word2 | 1 | 1.000 | 1.000 |" in md
    assert "pass@8" not in md and "k=8 skipped" in md


def test_mean_completion_tokens_when_rows_carry_token_ids():
    rows = [{**r, "token_ids": list(range(i % 3 + 1))} for i, r in enumerate(ROWS)]  # lengths 1, 2, 3, 1, ...
    rep = evaluate(rows, META, ks=(1,), label="lengths")
    assert rep.mean_tokens == approx(2.0)  # 12 rows: four each of 1, 2 and 3 tokens
    assert "truncated 8.3%, 2.0 completion tokens on average." in to_markdown(rep)
    assert EvalReport.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep
    assert evaluate(ROWS, META, ks=(1,)).mean_tokens is None  # rows without token_ids: not reported


def test_report_round_trip_and_save(report, tmp_path):
    d = json.loads(json.dumps(report.to_dict()))
    assert d["strict"]["pass_at_k"]["2"]["value"] == approx(7 / 9)
    assert EvalReport.from_dict(d) == report
    save_report(report, tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.md")
    assert sorted(os.listdir(tmp_path / "out")) == ["eval.json", "eval.md"]  # no temp files left
    assert EvalReport.from_dict(json.loads((tmp_path / "out" / "eval.json").read_text())) == report
    assert (tmp_path / "out" / "eval.md").read_text() == to_markdown(report)
    with pytest.raises(ReasonMaxxerError, match="not an evaluation report"):
        EvalReport.from_dict({"label": "x"})


def test_eval_json_records_what_was_evaluated(tmp_path, tiny_tokenizer):
    """eval.json names the weights' kind (merged checkpoint / adapter on its base), dtype and backend."""
    from conftest import make_tiny_model
    from peft import LoraConfig, get_peft_model

    from reasonmaxxer.data.problems import Problem
    from reasonmaxxer.data.prompts import get_template
    from reasonmaxxer.stages.evaluate import EvalConfig, evaluate_model

    merged = tmp_path / "train" / "merged"
    model = make_tiny_model(len(tiny_tokenizer), seed=3).to(torch.bfloat16)
    model.save_pretrained(merged)
    tiny_tokenizer.save_pretrained(merged)
    probs = [Problem(id="p0", question="1+1?", answer="2")]
    ecfg = EvalConfig(n=1, greedy=False, max_new_tokens=3, batch_size=2)
    args = (probs, get_template("raw"), ecfg)
    evaluate_model(model, tiny_tokenizer, str(merged), *args, tmp_path / "e1", progress=False)
    rec = json.loads((tmp_path / "e1" / "eval.json").read_text())["weights"]
    assert rec == {"spec": str(merged), "kind": "merged checkpoint", "dtype": "bfloat16", "served_by": "HFSampler"}
    assert "Weights: merged checkpoint" in (tmp_path / "e1" / "eval.md").read_text()
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter = tmp_path / "train" / "adapter"
    pm.save_pretrained(adapter)
    evaluate_model(pm, tiny_tokenizer, str(adapter), *args, tmp_path / "e2", progress=False)
    rec = json.loads((tmp_path / "e2" / "eval.json").read_text())["weights"]
    assert rec["kind"] == "adapter (unmerged, on its base)" and rec["dtype"] == "bfloat16"


def test_the_eval_configs_top_p_reaches_the_samplers_config(tmp_path, tiny_tokenizer):
    """[eval] top_p (the paper's 0.95) is the avg@n samples' nucleus mass, recorded in their
    store's manifest; the greedy store is decoded without it (and hashed without it)."""
    from conftest import make_tiny_model

    from reasonmaxxer.data.problems import Problem
    from reasonmaxxer.data.prompts import get_template
    from reasonmaxxer.stages.evaluate import EvalConfig, evaluate_model

    model = make_tiny_model(len(tiny_tokenizer), seed=3)
    probs = [Problem(id="p0", question="1+1?", answer="2")]
    ecfg = EvalConfig(n=2, top_p=0.95, greedy=True, max_new_tokens=3, batch_size=2)
    evaluate_model(model, tiny_tokenizer, "tiny", probs, get_template("raw"), ecfg, tmp_path, progress=False)
    sampled = json.loads((tmp_path / "samples" / "manifest.json").read_text())["config"]["sampling"]
    assert (sampled["top_p"], sampled["temperature"], sampled["n"]) == (0.95, 0.7, 2)
    greedy = json.loads((tmp_path / "greedy" / "manifest.json").read_text())["config"]["sampling"]
    assert (greedy["temperature"], greedy["top_p"]) == (0.0, 1.0)  # argmax: the same store as at top_p 1
    with pytest.raises(ReasonMaxxerError, match="top_p"):
        EvalConfig(top_p=0.0)


def test_validation_is_greedy_by_default_or_one_seeded_sample(monkeypatch):
    """validation_accuracy_fn decodes one completion a problem: greedy (top_p ignored), or
    sampled at the given temperature / top_p / seed; the accuracy is the strict one."""
    from reasonmaxxer.data.problems import Problem
    from reasonmaxxer.data.prompts import get_template
    from reasonmaxxer.stages import evaluate as ev

    seen = []

    class Sampler:
        def __init__(self, model, tokenizer):
            pass

        def generate(self, requests, cfg):
            seen.append(cfg)
            texts = {"p0": "The answer is 2.", "p1": "The answer is 5.", "p2": "no idea"}
            return [types.SimpleNamespace(text=texts[r.key[0]]) for r in requests]

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2, 3]}

    monkeypatch.setattr(ev, "HFSampler", Sampler)
    probs = [Problem(id=f"p{i}", question="q?", answer=a) for i, a in enumerate(["2", "4", "1"])]
    tmpl = get_template("raw")
    assert ev.validation_accuracy_fn(probs, tmpl, Tok(), 8, 4, top_p=0.5)(None) == pytest.approx(1 / 3)
    acc = ev.validation_accuracy_fn(probs, tmpl, Tok(), 8, 4, temperature=0.6, top_p=0.95, seed=42)(None)
    assert acc == pytest.approx(1 / 3)
    greedy, sampled = seen
    assert (greedy.n, greedy.temperature, greedy.top_p) == (1, 0.0, 1.0)
    assert (sampled.n, sampled.temperature, sampled.top_p, sampled.seed) == (1, 0.6, 0.95, 42)
