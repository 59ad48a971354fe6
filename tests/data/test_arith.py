"""Tests for reasonmaxxer.arith: determinism, prefixes, split disjointness, correct answers, mix."""

import json
import re
from collections import Counter

import pytest

from reasonmaxxer.data import arith
from reasonmaxxer.data.arith import DEFAULT_MIX, SPLITS, TIERS, evaluate_expression, generate, split_of
from reasonmaxxer.errors import ReasonMaxxerError

N_DISJOINT = 2000


@pytest.fixture(scope="module")
def per_tier():
    """{tier: {split: [Problem] x 2000}}, generated once for the module."""
    return {t: {s: generate(s, N_DISJOINT, seed=7, tiers=[t]) for s in SPLITS} for t in TIERS}


def test_default_mix_constants():
    assert TIERS == ("add1", "addsub2", "word1", "expr", "word2", "chain")
    assert "chain" not in DEFAULT_MIX  # the long-solution tier is asked for by name
    assert arith.DEFAULT_TIERS == tuple(DEFAULT_MIX) and arith.DEFAULT_WEIGHTS == tuple(DEFAULT_MIX.values())
    assert abs(sum(DEFAULT_MIX.values()) - 1) < 1e-9
    heavy = {"add1", "addsub2", "word1"}
    assert all(DEFAULT_MIX[t] > DEFAULT_MIX[u] for t in heavy for u in set(DEFAULT_MIX) - heavy)


def test_deterministic():
    a = generate("train", 200, seed=1)
    assert a == generate("train", 200, seed=1)
    assert [p.metadata for p in a] == [p.metadata for p in generate("train", 200, seed=1)]
    assert a != generate("train", 200, seed=2)


@pytest.mark.parametrize("tiers", [None, ["word2"], ["add1", "expr"], ["add1=3", "word1=1"]])
def test_small_n_is_a_prefix(tiers):
    big = generate("validation", 100, seed=5, tiers=tiers)
    for n in (0, 1, 10, 37):
        assert generate("validation", n, seed=5, tiers=tiers) == big[:n]


@pytest.mark.parametrize("tier", TIERS)
def test_splits_disjoint_per_tier(per_tier, tier):
    questions = {s: [p.question for p in per_tier[tier][s]] for s in SPLITS}
    for s in SPLITS:
        assert len(set(questions[s])) == N_DISJOINT, "duplicate question within a split"
        assert all(split_of(q) == s for q in questions[s])
        assert all(p.id.startswith(f"arith/{s}/{tier}/") for p in per_tier[tier][s])
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])


def test_splits_disjoint_across_seeds_and_mixes():
    train = {p.question for seed in range(3) for p in generate("train", 500, seed=seed)}
    test = {p.question for seed in range(3) for p in generate("test", 500, seed=seed, tiers=["add1", "word1"])}
    assert train and test and not train & test


def _ints(text: str) -> set[int]:
    return {int(x) for x in re.findall(r"\d+", text)}


def _safe_eval(expression: str) -> int:
    assert re.fullmatch(r"[\d\s+\-*()]+", expression)
    return eval(expression, {"__builtins__": {}}, {})  # our own digits-and-operators string


@pytest.mark.parametrize("tier", TIERS)
def test_answers_are_correct(per_tier, tier):
    for p in per_tier[tier]["train"][:1000]:
        expr = p.metadata["expression"]
        assert p.metadata["tier"] == tier
        assert p.answer == str(_safe_eval(expr)) == str(evaluate_expression(expr))
        assert int(p.answer) >= 0
        assert _ints(p.question) == _ints(expr), (p.question, expr)  # the operands are the question's
        if tier == "add1":
            nums = [int(x) for x in re.findall(r"\d+", p.question)]
            assert len(nums) == 2 and all(0 <= x <= 9 for x in nums) and int(p.answer) == sum(nums)
        elif tier == "addsub2":
            nums = [int(x) for x in re.findall(r"\d+", expr)]
            assert len(nums) == 2 and all(10 <= x <= 99 for x in nums)
        elif tier == "expr":
            assert all(1 <= x <= 9 for x in _ints(expr)) and len(re.findall(r"[+\-*]", expr)) >= 2
            assert expr in p.question
        elif tier == "word1":
            assert len(re.findall(r"[+\-*]", expr)) == 1
        elif tier == "word2":
            assert len(re.findall(r"[+\-*]", expr)) == 2
        elif tier == "chain":
            ops = re.findall(r"[+\-*]", expr)
            assert arith.CHAIN_STEPS[0] <= len(ops) == p.metadata["steps"] <= arith.CHAIN_STEPS[1]
            assert set(ops) <= {"+", "-"} and all(1 <= x <= 9 for x in _ints(expr))


def test_intermediate_values_never_negative(per_tier):
    for p in per_tier["expr"]["test"] + per_tier["word2"]["test"] + per_tier["chain"]["test"]:
        assert evaluate_expression(p.metadata["expression"], nonnegative=True) is not None


def test_word_problems_are_varied(per_tier):
    probs = per_tier["word1"]["train"] + per_tier["word2"]["train"]
    text = " ".join(p.question for p in probs)
    for verb in ("buys", "finds", "gives away", "loses", "eats", "bakes", "packs", "sells"):
        assert f" {verb} " in text, verb
    names = Counter(p.question.split()[0] for p in probs)
    assert len(names) >= 20
    assert len({p.metadata["family"] for p in probs}) == 4
    starts = Counter(re.sub(r"\d+", "N", p.question.split(".")[0]).split(" ", 1)[1] for p in probs)
    assert len(starts) > 100


def test_chain_steps_follow_the_question(per_tier):
    """A chain's expression is its question's steps in order: the running total is the answer."""
    words = {"add": "+", "plus": "+", "take away": "-", "subtract": "-", "minus": "-"}
    pattern = r"(add|plus|take away|subtract|minus) (\d)"
    for p in per_tier["chain"]["validation"][:300]:
        start = re.search(r"\d+", p.question).group()
        steps = " ".join(f"{words[w]} {b}" for w, b in re.findall(pattern, p.question))
        assert p.metadata["expression"] == f"{start} {steps}"
    lengths = Counter(p.metadata["steps"] for p in per_tier["chain"]["train"])
    assert set(lengths) == set(range(arith.CHAIN_STEPS[0], arith.CHAIN_STEPS[1] + 1))


def test_default_tier_mix_is_exact():
    probs = generate("train", 1000, seed=0)
    counts = Counter(p.metadata["tier"] for p in probs)
    assert counts == {t: round(w * 1000) for t, w in DEFAULT_MIX.items()}
    for n in (7, 33, 101):  # every prefix within one problem per tier
        c = Counter(p.metadata["tier"] for p in probs[:n])
        assert all(abs(c[t] - w * n) <= 1 for t, w in DEFAULT_MIX.items())


def test_custom_tiers_and_weights():
    c = Counter(p.metadata["tier"] for p in generate("test", 100, tiers=["add1=3", "word1=1"]))
    assert c == {"add1": 75, "word1": 25}
    c = Counter(p.metadata["tier"] for p in generate("test", 90, tiers=["expr", "word2", "addsub2"]))
    assert c == {"expr": 30, "word2": 30, "addsub2": 30}


def test_ids_unique_and_metadata_json():
    probs = generate("train", 3000, seed=11)
    assert len({p.id for p in probs}) == 3000
    assert all(re.fullmatch(r"arith/train/(add1|addsub2|word1|expr|word2|chain)/[0-9a-f]{12}", p.id) for p in probs)
    json.dumps([p.to_dict() for p in probs])
    assert all(p.metadata["source"] == "arith" for p in probs)


def test_split_shares():
    shares = Counter(split_of(f"question {i}") for i in range(20000))
    assert abs(shares["train"] / 20000 - 0.8) < 0.02
    assert abs(shares["validation"] / 20000 - 0.1) < 0.01 and abs(shares["test"] / 20000 - 0.1) < 0.01


def test_exhausted_tier_raises():
    with pytest.raises(ReasonMaxxerError, match=r"arith tier 'add1' ran out of new test questions after \d+"):
        generate("test", 6000, tiers=["add1"])


@pytest.mark.parametrize(
    "args,match",
    [
        (("dev", 3), r"unknown arith split 'dev'; valid splits: train, validation, test"),
        (("train", -1), r"n must be a non-negative integer"),
        (("train", 3, 0, ["add3"]), r"unknown arith tier 'add3'; valid tiers: add1, addsub2"),
        (("train", 3, 0, ["add1=x"]), r"bad weight 'x'"),
        (("train", 3, 0, ["add1=0"]), r"no arith tiers with positive weight"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ReasonMaxxerError, match=match):
        generate(*args)


def test_evaluate_expression():
    assert evaluate_expression("(4 + 3) * 2 - 5") == 9
    assert evaluate_expression("2 - 5") is None
    assert evaluate_expression("2 - 5", nonnegative=False) == -3
    assert evaluate_expression("2 / 1") is None and evaluate_expression("__import__('os')") is None
    assert evaluate_expression("2 +") is None
