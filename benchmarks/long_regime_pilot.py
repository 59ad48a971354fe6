"""The pilot behind the method study's `long` regime (issue #13): how often does the embedded
default solve problems whose solutions are long, and how long are its completions?

    python benchmarks/long_regime_pilot.py chain 8 40 plain     # 40 running-total chains of 8 steps
    python benchmarks/long_regime_pilot.py chain 6 32 restate   # ... worked as "Step i: add 5. 7 + 5 = 12."
    python benchmarks/long_regime_pilot.py chain 6 32 list      # ... the steps given as "+5, -3, ..."
    python benchmarks/long_regime_pilot.py verbose arith:test:40:add1,addsub2,word1,word2 200

`chain`: "Start with 7. Then add 5, then take away 3, ... What number do you end with?" with
three worked chains (K-1, K+1 and K steps) as few-shot examples, <= 10 + 14 K new tokens.
`verbose`: the given problems with the `verbose` template. Both print the base's avg@4 and
greedy accuracy (95% intervals), the truncation rate and the completion lengths (tokens), and
keep the stores under ``runs/long_pilot``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ADD = ("add {b}", "add {b} more", "plus {b}")
SUB = ("take away {b}", "subtract {b}", "minus {b}")


def chain(rng: random.Random, k: int, style: str):
    """(question, answer, start, [(op, operand)], [step words]) of one k-step chain."""
    t = start = rng.randint(2, 9)
    ops, words = [], []
    for _ in range(k):
        b = rng.randint(1, 9)
        sub = t - b >= 0 and rng.random() < 0.5
        t += -b if sub else b
        ops.append(("-" if sub else "+", b))
        words.append(rng.choice(SUB if sub else ADD).format(b=b))
    if style == "list":
        q = f"Start with {start}. Then do these steps in order: {', '.join(f'{o}{b}' for o, b in ops)}."
    else:
        q = f"Start with {start}. Then {', then '.join(words)}."
    return q + " What number do you end with?", t, start, ops, words


def worked(start: int, ops, words, style: str) -> str:
    t, lines = start, []
    for i, (o, b) in enumerate(ops, 1):
        n = t + b if o == "+" else t - b
        lines.append(
            f"Step {i}: {words[i - 1]}. {t} {o} {b} = {n}." if style == "restate" else f"Step {i}: {t} {o} {b} = {n}."
        )
        t = n
    return " ".join(lines) + f" The answer is \\boxed{{{t}}}."


def chain_setup(k: int, n: int, style: str):
    from reasonmaxxer.data.problems import Problem
    from reasonmaxxer.data.prompts import TEMPLATES, PromptTemplate

    ex_rng, rng = random.Random(99), random.Random(7)
    shots = []
    for kk in (k - 1, k + 1, k):
        q, _, s, ops, words = chain(ex_rng, kk, style)
        shots.append((q, worked(s, ops, words, style)))
    tmpl = PromptTemplate("chain", "fewshot", TEMPLATES["fewshot"].template, fewshot=tuple(shots))
    probs = [Problem(f"chain-{i}", q, str(t)) for i, (q, t, *_) in enumerate(chain(rng, k, style) for _ in range(n))]
    return probs, tmpl, 10 + 14 * k, f"chain-{style}-k{k}-n{n}"


def main(argv: list[str]) -> None:
    import torch

    from reasonmaxxer.data.benchmarks import load_problems
    from reasonmaxxer.data.prompts import TEMPLATES
    from reasonmaxxer.models import load_model
    from reasonmaxxer.stages.evaluate import EvalConfig, evaluate_model

    torch.manual_seed(0)
    if argv[0] == "chain":
        probs, tmpl, max_new, name = chain_setup(int(argv[1]), int(argv[2]), argv[3])
    elif argv[0] == "verbose":
        probs, tmpl, max_new = load_problems(argv[1]), TEMPLATES["verbose"], int(argv[2])
        name = "verbose-" + argv[1].replace(":", "_").replace(",", "-")
    else:
        raise SystemExit(__doc__)
    model, tok = load_model("smollm2-135m")
    t0 = time.time()
    out = Path(__file__).resolve().parents[1] / "runs" / "long_pilot" / name
    rep, stores = evaluate_model(
        model, tok, "smollm2-135m", probs, tmpl, EvalConfig(n=4, max_new_tokens=max_new), out, progress=False
    )
    a, g = rep.strict.avg_at_n, rep.strict.greedy
    print(f"{name}: {len(probs)} problems, <= {max_new} new tokens, {time.time() - t0:.0f} s")
    print(
        f"  avg@4 {100 * a.value:.1f} [{100 * a.low:.1f}, {100 * a.high:.1f}]  greedy {100 * g.value:.1f} "
        f"[{100 * g.low:.1f}, {100 * g.high:.1f}]  truncated {100 * rep.truncation_rate:.1f}%"
    )
    for store, label in zip(stores, ("sampled", "greedy"), strict=True):
        lengths = sorted(len(r["token_ids"]) for r in store.read_rows(["token_ids"]))
        print(
            f"  {label} completion tokens: mean {sum(lengths) / len(lengths):.1f}, median {lengths[len(lengths) // 2]}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
