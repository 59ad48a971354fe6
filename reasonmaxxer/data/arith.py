"""Seeded procedural arithmetic problems with exact integer answers, in five difficulty tiers.

Tiers, easiest first (``TIERS``):
- ``add1``: single-digit addition ("What is 3 + 5?") in 480 wordings (12 phrasings x 8
  lead-ins x 5 closing remarks), since there are only 100 operand pairs;
- ``addsub2``: two-digit addition or subtraction (never negative);
- ``word1``: a one-step word problem (a change, equal groups, or a comparison);
- ``expr``: a multi-step expression over single digits ("(4 + 3) * 2 - 5"), every
  intermediate value non-negative;
- ``word2``: a two-step word problem;
- ``chain``: a running total over 6-10 single-digit steps ("Start with 7. Then add 5, then
  take away 3, ... What number do you end with?"), never negative: a long-solution tier for
  models larger than the embedded default (a worked solution is one line per step; no
  built-in template shows one: see ``benchmarks/long_regime_pilot.py``). Not in the default mix.
Word problems draw names, objects, verbs (buys, finds, gives away, loses, eats, bakes,
packs, ...) and sentence templates at random; all answers are integers >= 0.

Splits are disjoint by construction: a question's split is a hash of its exact text
(`split_of`: 80% train, 10% validation, 10% test), and a generator for split S only keeps
candidates whose text hashes to S. So the same question can never appear in two splits, for
any n, seed or tier mix. Problems are drawn from one seeded stream, so (split, n, seed,
tiers) fixes the output and a smaller n gives a prefix of a larger one. Tiers are
interleaved by smooth weighted round-robin, so every prefix follows the mix to within one
problem per tier. A tier whose split runs out of new questions raises an error (add1 has
about 4,800 test questions; the other tiers are practically unlimited).

The default mix (``DEFAULT_MIX``) targets SmolLM2-135M-Instruct (3-shot, T=0.7), measured
at about 34% on add1, 26% on one-step and ~1% on two-step word problems: it is weighted to
the tiers where the model sometimes succeeds (mixed success is what the curation step keeps)
with a little of the harder tiers. Limitation: the operand pairs of add1 (and many of
addsub2) recur across splits in different wordings; only question texts are disjoint.
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections.abc import Callable, Sequence
from fractions import Fraction

from ..errors import ReasonMaxxerError
from .arith_words import Draw, word1, word2
from .problems import Problem

__all__ = [
    "TIERS",
    "SPLITS",
    "DEFAULT_MIX",
    "DEFAULT_TIERS",
    "DEFAULT_WEIGHTS",
    "generate",
    "split_of",
    "evaluate_expression",
]


TIERS: tuple[str, ...] = ("add1", "addsub2", "word1", "expr", "word2", "chain")


CHAIN_STEPS: tuple[int, int] = (6, 10)  # fewest and most steps of a ``chain`` problem


SPLITS: tuple[str, ...] = ("train", "validation", "test")


DEFAULT_MIX: dict[str, float] = {"add1": 0.30, "addsub2": 0.25, "word1": 0.30, "expr": 0.10, "word2": 0.05}


DEFAULT_TIERS: tuple[str, ...] = tuple(DEFAULT_MIX)


DEFAULT_WEIGHTS: tuple[float, ...] = tuple(DEFAULT_MIX.values())


_MAX_MISSES = 50_000  # consecutive draws without a new question before a tier is "exhausted"


def split_of(question: str) -> str:
    """The split a question text belongs to: sha256 bucket 0-9 -> test, 10-19 -> validation."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


def evaluate_expression(expression: str, nonnegative: bool = True) -> int | None:
    """Integer value of an expression of ints, + - * and brackets; None if an intermediate
    value is negative (with nonnegative) or the expression uses anything else."""

    def ev(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            left, right = ev(node.left), ev(node.right)
            if left is None or right is None:
                return None
            value = {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
            return None if nonnegative and value < 0 else value
        return None

    try:
        return ev(ast.parse(expression, mode="eval").body)
    except SyntaxError:
        return None


_LEADS = (
    "",
    "Quick question: ",
    "Mental math: ",
    "Try this one: ",
    "Here is a problem. ",
    "Practice problem: ",
    "Math time! ",
    "Warm-up: ",
)


_CLOSERS = ("", " Answer with a whole number.", " Give just the number.", " Show your steps.", " Think carefully.")


_ADD_CORES = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Calculate {a} + {b}.",
    "Find {a} + {b}.",
    "Evaluate {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "Find the sum of {a} and {b}.",
    "Add {a} and {b}.",
    "What do you get if you add {a} and {b}?",
    "How much is {a} plus {b}?",
    "What number is {a} more than {b}?",
)


_SUB_CORES = (
    "What is {a} - {b}?",
    "What is {a} minus {b}?",
    "Compute {a} - {b}.",
    "Calculate {a} - {b}.",
    "Evaluate {a} - {b}.",
    "Subtract {b} from {a}.",
    "What is the difference between {a} and {b}?",
    "What do you get if you take {b} from {a}?",
)


_EXPR_CORES = (
    "What is {e}?",
    "Compute {e}.",
    "Calculate {e}.",
    "Evaluate {e}.",
    "What is the value of {e}?",
    "Work out {e}.",
)


_EXPR_SHAPES = (
    "({a} + {b}) * {c}",
    "({a} + {b}) * {c} - {d}",
    "{a} * {b} + {c}",
    "{a} + {b} * {c}",
    "{a} * {b} - {c}",
    "({a} - {b}) * {c}",
    "{a} * ({b} + {c})",
    "{a} + {b} - {c}",
    "{a} * {b} + {c} * {d}",
    "{a} * {b} - {c} - {d}",
    "({a} + {b} + {c}) * {d}",
    "{a} * ({b} - {c}) + {d}",
)


def _wrap(rng: random.Random, core: str) -> str:
    return rng.choice(_LEADS) + core + rng.choice(_CLOSERS)


def _add1(rng: random.Random) -> Draw:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Draw(_wrap(rng, rng.choice(_ADD_CORES).format(a=a, b=b)), f"{a} + {b}", {})


def _addsub2(rng: random.Random) -> Draw:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return Draw(_wrap(rng, rng.choice(_ADD_CORES).format(a=a, b=b)), f"{a} + {b}", {})
    a, b = max(a, b), min(a, b)
    return Draw(_wrap(rng, rng.choice(_SUB_CORES).format(a=a, b=b)), f"{a} - {b}", {})


_CHAIN_STARTS = ("Start with {a}.", "Begin with {a}.", "Take the number {a}.", "Think of the number {a}.")


_CHAIN_ADDS = ("add {b}", "add {b} more", "plus {b}")


_CHAIN_SUBS = ("take away {b}", "subtract {b}", "minus {b}")


_CHAIN_ENDS = ("What number do you end with?", "What is the result?", "What number do you get?")


def _chain(rng: random.Random) -> Draw:
    """A running total over CHAIN_STEPS single-digit additions and subtractions, never negative."""
    total = rng.randint(2, 9)
    start, expression, steps = total, str(total), []
    for _ in range(rng.randint(*CHAIN_STEPS)):
        b = rng.randint(1, 9)
        sub = total - b >= 0 and rng.random() < 0.5
        total += -b if sub else b
        expression += f" {'-' if sub else '+'} {b}"
        steps.append(rng.choice(_CHAIN_SUBS if sub else _CHAIN_ADDS).format(b=b))
    question = f"{rng.choice(_CHAIN_STARTS).format(a=start)} Then {', then '.join(steps)}. {rng.choice(_CHAIN_ENDS)}"
    return Draw(question, expression, {"steps": len(steps)})


def _expr(rng: random.Random) -> Draw:
    while True:
        shape = rng.choice(_EXPR_SHAPES)
        e = shape.format(**{k: rng.randint(1, 9) for k in "abcd"})
        if evaluate_expression(e) is not None:
            return Draw(_wrap(rng, rng.choice(_EXPR_CORES).format(e=e)), e, {})


_GENERATORS: dict[str, Callable[[random.Random], Draw]] = {
    "add1": _add1,
    "addsub2": _addsub2,
    "word1": word1,
    "expr": _expr,
    "word2": word2,
    "chain": _chain,
}


def _parse_tiers(tiers: Sequence[str] | None) -> list[tuple[str, Fraction]]:
    """[(tier, weight)] from names or "name=weight" strings; None means DEFAULT_MIX."""
    if tiers is None:
        return [(t, Fraction(str(w))) for t, w in DEFAULT_MIX.items()]
    if isinstance(tiers, str):
        tiers = [t for t in tiers.split(",") if t.strip()]
    out: dict[str, Fraction] = {}
    for item in tiers:
        name, _, weight = str(item).partition("=")
        name = name.strip()
        if name not in _GENERATORS:
            raise ReasonMaxxerError(f"unknown arith tier {name!r}; valid tiers: {', '.join(TIERS)}")
        try:
            w = Fraction(weight.strip()) if weight.strip() else Fraction(1)
        except (ValueError, ZeroDivisionError):
            raise ReasonMaxxerError(f"bad weight {weight!r} for arith tier {name!r}") from None
        if w < 0:
            raise ReasonMaxxerError(f"negative weight {weight!r} for arith tier {name!r}")
        out[name] = out.get(name, Fraction(0)) + w
    if not out or sum(out.values()) == 0:
        raise ReasonMaxxerError(f"no arith tiers with positive weight; valid tiers: {', '.join(TIERS)}")
    return [(t, w) for t, w in out.items() if w > 0]


def generate(split: str, n: int, seed: int = 0, tiers: Sequence[str] | None = None) -> list[Problem]:
    """n arithmetic problems of one split, deterministic in (split, n, seed, tiers).

    tiers: tier names (equal weights) or "name=weight" strings; None uses DEFAULT_MIX.
    Ids are ``arith/<split>/<tier>/<12 hex of sha256(question)>``; metadata holds ``tier``,
    ``expression`` (evaluates to the answer) and, for word problems, ``family``.
    """
    if split not in SPLITS:
        raise ReasonMaxxerError(f"unknown arith split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ReasonMaxxerError(f"arith: n must be a non-negative integer, got {n!r}")
    mix = _parse_tiers(tiers)
    mix_key = ",".join(f"{t}={w}" for t, w in mix)
    rng = random.Random(f"reasonmaxxer.arith|{seed}|{split}|{mix_key}")
    total = sum(w for _, w in mix)
    current = [Fraction(0)] * len(mix)
    seen: dict[str, str] = {}  # question -> tier
    problems: list[Problem] = []
    for _ in range(n):
        # smooth weighted round-robin: every prefix follows the mix to within one per tier
        for i, (_, w) in enumerate(mix):
            current[i] += w
        k = max(range(len(mix)), key=lambda i: current[i])
        current[k] -= total
        tier = mix[k][0]
        problems.append(_next_problem(rng, tier, split, seen))
    return problems


def _next_problem(rng: random.Random, tier: str, split: str, seen: dict[str, str]) -> Problem:
    """Draw candidates of one tier until one is new and hashes to split."""
    gen = _GENERATORS[tier]
    for _ in range(_MAX_MISSES):
        draw = gen(rng)
        if draw.question in seen or split_of(draw.question) != split:
            continue
        seen[draw.question] = tier
        answer = evaluate_expression(draw.expression)
        assert answer is not None and answer >= 0, draw  # generators only build valid problems
        key = hashlib.sha256(draw.question.encode("utf-8")).hexdigest()[:12]
        meta = {"source": "arith", "tier": tier, "expression": draw.expression, **draw.extra}
        return Problem(f"arith/{split}/{tier}/{key}", draw.question, str(answer), meta)
    count = sum(1 for t in seen.values() if t == tier)
    raise ReasonMaxxerError(
        f"arith tier {tier!r} ran out of new {split} questions after {count} of them; "
        f"ask for fewer problems or mix in other tiers"
    )
