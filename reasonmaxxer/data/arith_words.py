"""Word problems for the arithmetic generator (`data.arith`): tiers ``word1`` (one step: a change,
equal groups, or a comparison) and ``word2`` (two steps). Names, objects, verbs and sentence
templates are drawn from one seeded `random.Random`, so the output depends on the stream only."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Draw:
    """One candidate problem: its text, the expression that computes its answer, metadata."""

    question: str
    expression: str
    extra: dict


# (name, subject pronoun, object pronoun); Mia, Sam and Tom are reserved for prompt examples.
NAMES = (
    ("Ava", "she", "her"),
    ("Ben", "he", "him"),
    ("Carlos", "he", "him"),
    ("Dana", "she", "her"),
    ("Eli", "he", "him"),
    ("Fatima", "she", "her"),
    ("Grace", "she", "her"),
    ("Hiro", "he", "him"),
    ("Ines", "she", "her"),
    ("Jack", "he", "him"),
    ("Kofi", "he", "him"),
    ("Lena", "she", "her"),
    ("Maya", "she", "her"),
    ("Noah", "he", "him"),
    ("Omar", "he", "him"),
    ("Priya", "she", "her"),
    ("Rosa", "she", "her"),
    ("Leo", "he", "him"),
    ("Sofia", "she", "her"),
    ("Tariq", "he", "him"),
    ("Uma", "she", "her"),
    ("Victor", "he", "him"),
    ("Wen", "she", "her"),
    ("Yusuf", "he", "him"),
    ("Zoe", "she", "her"),
    ("Aisha", "she", "her"),
    ("Diego", "he", "him"),
    ("Hannah", "she", "her"),
    ("Ivan", "he", "him"),
    ("Julia", "she", "her"),
)


# plural object -> tags (food: can be eaten; baked: can be baked; pick: can be picked;
# thing: can be found, lost, won, used)
_OBJECTS = {
    "apples": {"food", "pick"},
    "oranges": {"food", "pick"},
    "strawberries": {"food", "pick"},
    "cookies": {"food", "baked"},
    "cupcakes": {"food", "baked"},
    "muffins": {"food", "baked"},
    "candies": {"food"},
    "carrots": {"food", "pick"},
    "flowers": {"pick"},
    "marbles": {"thing"},
    "stickers": {"thing"},
    "pencils": {"thing"},
    "crayons": {"thing"},
    "books": {"thing"},
    "toy cars": {"thing"},
    "seashells": {"thing"},
    "stamps": {"thing"},
    "coins": {"thing"},
    "balloons": {"thing"},
    "baseball cards": {"thing"},
}


_CONTAINERS = (
    ("boxes", "box"),
    ("bags", "bag"),
    ("jars", "jar"),
    ("baskets", "basket"),
    ("trays", "tray"),
    ("packs", "pack"),
)


_PLACES = ("bag", "box", "room", "basket", "backpack", "drawer")


# (template, required tag or None); {P}: capitalised subject pronoun, {o}: object pronoun
_STARTS = (
    ("{name} has {n} {obj}.", None),
    ("{name} starts the day with {n} {obj}.", None),
    ("There are {n} {obj} in {name}'s {place}.", None),
    ("{name} buys {n} {obj}.", None),
    ("{name} collects {n} {obj}.", "thing"),
    ("{name} bakes {n} {obj}.", "baked"),
    ("{name} picks {n} {obj}.", "pick"),
)


_GAINS = (
    ("{P} buys {n} more {obj}.", None),
    ("{friend} gives {o} {n} more {obj}.", None),
    ("{P} gets {n} more {obj} from {friend}.", None),
    ("{P} finds {n} more {obj}.", "thing"),
    ("{P} wins {n} more {obj}.", "thing"),
    ("{P} bakes {n} more {obj}.", "baked"),
    ("{P} picks {n} more {obj}.", "pick"),
)


_LOSSES = (
    ("{P} gives away {n} {obj}.", None),
    ("{P} gives {n} {obj} to {friend}.", None),
    ("{P} sells {n} {obj}.", None),
    ("{P} shares {n} {obj} with {friend}.", None),
    ("{P} loses {n} {obj}.", "thing"),
    ("{P} uses {n} {obj}.", "thing"),
    ("{P} eats {n} {obj}.", "food"),
)


_ASK_NOW = (
    "How many {obj} does {name} have now?",
    "How many {obj} does {p} have at the end?",
    "What is the total number of {obj} {name} has now?",
)


_ASK_LEFT = ("How many {obj} does {name} have left?", "How many {obj} are left?")


@dataclass(frozen=True)
class _Scene:
    """The cast of one word problem and the str.format fields that describe it."""

    fields: dict
    tags: frozenset


def _scene(rng: random.Random) -> _Scene:
    name, p, o = rng.choice(NAMES)
    friend = rng.choice([n for n, _, _ in NAMES if n != name])
    obj = rng.choice(sorted(_OBJECTS))
    cont, cont1 = rng.choice(_CONTAINERS)
    fields = dict(
        name=name, p=p, P=p.capitalize(), o=o, friend=friend, obj=obj, place=rng.choice(_PLACES), cont=cont, cont1=cont1
    )
    return _Scene(fields, frozenset(_OBJECTS[obj]))


def _pick(rng: random.Random, options: tuple, scene: _Scene, **values) -> str:
    usable = [t for t, tag in options if tag is None or tag in scene.tags]
    return rng.choice(usable).format(**scene.fields, **values)


def _change_steps(rng: random.Random, scene: _Scene, steps: int) -> Draw:
    """A start amount then `steps` gains/losses; the running total never drops below 1."""
    total = rng.randint(5, 20)
    sentences, expr = [_pick(rng, _STARTS, scene, n=total)], str(total)
    last = "+"
    for _ in range(steps):
        if total > 2 and rng.random() < 0.5:
            n = rng.randint(2, total - 1)
            sentences.append(_pick(rng, _LOSSES, scene, n=n))
            total, expr, last = total - n, f"{expr} - {n}", "-"
        else:
            n = rng.randint(2, 20)
            sentences.append(_pick(rng, _GAINS, scene, n=n))
            total, expr, last = total + n, f"{expr} + {n}", "+"
    asks = _ASK_NOW + (_ASK_LEFT if last == "-" else ())
    sentences.append(rng.choice(asks).format(**scene.fields))
    return Draw(" ".join(sentences), expr, {"family": "change"})


_GROUPS = (
    "{name} packs {a} {cont} with {b} {obj} in each {cont1}.",
    "{name} buys {a} {cont} of {obj}. Each {cont1} holds {b} {obj}.",
    "There are {a} {cont} in {name}'s {place}, and each {cont1} has {b} {obj}.",
)


_GROUPS_ASK = ("How many {obj} are there in all?", "How many {obj} does {name} have in total?")


def _groups(rng: random.Random, scene: _Scene, then: bool) -> Draw:
    """Equal groups (a x b), optionally followed by one gain or loss."""
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    sentences, expr = [rng.choice(_GROUPS).format(**scene.fields, a=a, b=b)], f"{a} * {b}"
    asks = _GROUPS_ASK
    if then:
        if rng.random() < 0.5:
            n = rng.randint(2, a * b - 1)
            sentences.append(_pick(rng, _LOSSES, scene, n=n))
            expr, asks = f"{expr} - {n}", _ASK_LEFT + _ASK_NOW
        else:
            n = rng.randint(2, 20)
            sentences.append(_pick(rng, _GAINS, scene, n=n))
            expr, asks = f"{expr} + {n}", _ASK_NOW
    sentences.append(rng.choice(asks).format(**scene.fields))
    return Draw(" ".join(sentences), expr, {"family": "groups"})


def _compare(rng: random.Random, scene: _Scene, total: bool) -> Draw:
    """Two people: friend has b more/fewer than name; ask for friend's count or the total."""
    f = scene.fields
    a = rng.randint(5, 20)
    more = rng.random() < 0.5
    b = rng.randint(2, 15) if more else rng.randint(2, a - 1)
    word, sign = ("more", "+") if more else ("fewer", "-")
    if not total and rng.random() < 0.4:  # "How many more does name have than friend?"
        c = rng.randint(2, a - 1)
        q = (
            f"{f['name']} has {a} {f['obj']} and {f['friend']} has {c} {f['obj']}. "
            f"How many more {f['obj']} does {f['name']} have than {f['friend']}?"
        )
        return Draw(q, f"{a} - {c}", {"family": "compare"})
    q = f"{f['name']} has {a} {f['obj']}. {f['friend']} has {b} {word} {f['obj']} than {f['name']}. "
    if total:
        q += f"How many {f['obj']} do {f['name']} and {f['friend']} have together?"
        return Draw(q, f"{a} + ({a} {sign} {b})", {"family": "compare"})
    q += f"How many {f['obj']} does {f['friend']} have?"
    return Draw(q, f"{a} {sign} {b}", {"family": "compare"})


def _combine_then(rng: random.Random, scene: _Scene) -> Draw:
    """Two people pool their objects, then give some away: (a + b) - c."""
    f = scene.fields
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(2, a + b - 1)
    verb = rng.choice(
        (
            "give away",
            "sell",
            "lose" if "thing" in scene.tags else "give away",
            "eat" if "food" in scene.tags else "sell",
        )
    )
    q = (
        f"{f['name']} has {a} {f['obj']} and {f['friend']} has {b} {f['obj']}. They put them "
        f"together and {verb} {c} of them. How many {f['obj']} do they have left?"
    )
    return Draw(q, f"{a} + {b} - {c}", {"family": "combine"})


def word1(rng: random.Random) -> Draw:
    scene = _scene(rng)
    kind = rng.random()
    if kind < 0.6:
        return _change_steps(rng, scene, 1)
    if kind < 0.8:
        return _groups(rng, scene, then=False)
    return _compare(rng, scene, total=False)


def word2(rng: random.Random) -> Draw:
    scene = _scene(rng)
    kind = rng.random()
    if kind < 0.5:
        return _change_steps(rng, scene, 2)
    if kind < 0.7:
        return _groups(rng, scene, then=True)
    if kind < 0.85:
        return _compare(rng, scene, total=True)
    return _combine_then(rng, scene)
