"""Tests for reasonmaxxer.select: hand-built rollout rows, expected values worked out by hand."""

import copy
import math
import random

import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.select import (
    ProblemStats,
    SelectionConfig,
    format_histogram,
    pass_rate_histogram,
    problem_stats,
    select,
    shuffle_rewards,
    signal_clarity,
)

SQRT3 = math.sqrt(3)  # 1.7320...
INV_SQRT3 = 1 / math.sqrt(3)  # 0.5774...
SQRT2 = math.sqrt(2)  # 1.4142...
TOL = 1e-4  # advantages are float32 and carry the +1e-6 of the denominator


def row(pid, i, reward, length, truncated=False, ents=None):
    r = {
        "problem_id": pid,
        "sample_index": i,
        "token_ids": list(range(100, 100 + length)),
        "prompt_ids": [1, 2, 3],
        "truncated": truncated,
        "reward": float(reward),
        "strict_correct": reward == 1,
    }
    if ents is not None:
        r["base_entropies"] = list(ents)
    return r


def group(pid, rewards, lengths, truncated=()):
    if isinstance(lengths, int):
        lengths = [lengths] * len(rewards)
    return [row(pid, i, r, n, i in truncated) for i, (r, n) in enumerate(zip(rewards, lengths))]


def pool():
    """6 problems x 4 samples.

    p1 [1,0,0,0] len 10   pass .25
    p2 [1,1,0,0] len 20   pass .50
    p3 [1,1,1,0] len 8    pass .75
    p4 [1,1,1,1] len 12   all correct
    p5 [0,0,0,0] len 12   all wrong
    p6 [1,0,1,1] len 30, sample 3 truncated (graded correct):
        drop -> [1,0,1]   pass 2/3, |.-.5| = 1/6
        mask -> [1,0,1,0] pass .5,  |.-.5| = 0, 1 truncation
        keep -> [1,0,1,1] pass .75, |.-.5| = .25, 1 truncation
    """
    return (
        group("p1", [1, 0, 0, 0], 10)
        + group("p2", [1, 1, 0, 0], 20)
        + group("p3", [1, 1, 1, 0], 8)
        + group("p4", [1, 1, 1, 1], 12)
        + group("p5", [0, 0, 0, 0], 12)
        + group("p6", [1, 0, 1, 1], 30, truncated={3})
    )


def adv_of(sel):
    return {(r["problem_id"], r["sample_index"]): r["advantage"] for r in sel.rows}


NONE = SelectionConfig(order="none")


# --------------------------------------------------------------------------- ranking


def test_drop_ranking_groups_and_stats():
    sel = select(pool(), NONE)
    # |pass - .5|: p2 0, p6 1/6, p3 .25 (mean len 8), p1 .25 (mean len 10) -> p3 before p1
    assert [p.problem_id for p in sel.problems] == ["p2", "p6", "p3", "p1"]
    # order "none": problem rank, then sample_index; p6/3 dropped (truncated)
    assert [(r["problem_id"], r["sample_index"], r["group"]) for r in sel.rows] == (
        [("p2", i, 0) for i in range(4)]
        + [("p6", i, 1) for i in range(3)]
        + [("p3", i, 2) for i in range(4)]
        + [("p1", i, 3) for i in range(4)]
    )
    p6 = sel.problems[1]
    assert (p6.n, p6.n_correct, p6.n_truncated, p6.mean_length) == (3, 2, 1, 30.0)
    assert p6.pass_rate == pytest.approx(2 / 3)
    st = sel.stats
    assert (st["problems_total"], st["problems_mixed"], st["problems_all_correct"], st["problems_all_wrong"]) == (
        6,
        4,
        1,
        1,
    )
    assert (
        st["problems_kept"],
        st["rollouts_kept"],
        st["rollouts_dropped_truncated"],
        st["rollouts_dropped_length"],
    ) == (4, 15, 1, 0)
    assert st["rollouts_total"] == 24 and st["rollouts_masked_truncated"] == 0
    # pass rates p1 .25->bin 2, p2 .5->5, p3 .75->7, p4 1->9, p5 0->0, p6 2/3 (6.67)->6
    assert st["pass_rate_histogram"] == [1, 0, 1, 0, 0, 1, 1, 1, 0, 1]
    # (.25 + .5 + .75 + 1 + 0 + 2/3) / 6 = 0.52778
    assert st["mean_pass_rate"] == pytest.approx(0.527778, abs=1e-6)
    assert all(r["mask_decision"] is False for r in sel.rows)


def test_advantages_by_hand():
    a = adv_of(select(pool(), NONE))
    # p1 [1,0,0,0]: mean .25, pop std sqrt(.25*.75) = .4330 -> 1.732, -0.577 x3
    assert [a[("p1", i)] for i in range(4)] == pytest.approx([SQRT3, -INV_SQRT3, -INV_SQRT3, -INV_SQRT3], abs=TOL)
    # p2 [1,1,0,0]: mean .5, std .5 -> +-1
    assert [a[("p2", i)] for i in range(4)] == pytest.approx([1, 1, -1, -1], abs=TOL)
    # p3 [1,1,1,0]: mean .75, std .4330 -> .577 x3, -1.732
    assert [a[("p3", i)] for i in range(4)] == pytest.approx([INV_SQRT3] * 3 + [-SQRT3], abs=TOL)
    # p6 after drop [1,0,1]: mean 2/3, std sqrt(2)/3 = .4714 -> .7071, -1.4142, .7071
    assert [a[("p6", i)] for i in range(3)] == pytest.approx([1 / SQRT2, -SQRT2, 1 / SQRT2], abs=TOL)


def test_advantage_clipped():
    # 1 of 10 correct: mean .1, std .3 -> correct (.9/.3 = 3) clipped to 2.5, wrong -.1/.3 = -.3333
    sel = select(group("x", [1] + [0] * 9, 5), NONE)
    assert [r["advantage"] for r in sel.rows] == pytest.approx([2.5] + [-1 / 3] * 9, abs=TOL)


def test_max_problems():
    sel = select(pool(), SelectionConfig(max_problems=2, order="none"))
    assert [p.problem_id for p in sel.problems] == ["p2", "p6"]
    assert sel.stats["problems_kept"] == 2 and sel.stats["rollouts_kept"] == 7
    assert sel.stats["problems_mixed"] == 4
    assert [p.problem_id for p in select(pool(), SelectionConfig(max_problems=None, order="none")).problems] == [
        "p2",
        "p6",
        "p3",
        "p1",
    ]


def test_ties_exact_then_truncation_length_id():
    rows = (
        # 3/10 and 7/10 are both .2 from .5; in floats |.3-.5| = .2 > |.7-.5| = .19999999999999996,
        # so an inexact key would put "b" first. Same length, no truncation -> by problem_id.
        group("b", [1] * 7 + [0] * 3, 6)
        + group("a", [1] * 3 + [0] * 7, 6)
        # pass .5: "z" (no truncation, len 9) < "y" (len 9, 1 truncation, under keep) ; "w" len 4 before both
        + group("y", [1, 0], 9, truncated={1})
        + group("z", [0, 1], 9)
        + group("w", [1, 0], 4)
        # exact duplicate statistics -> by problem_id: "m1" before "m2"
        + group("m2", [1, 0, 0, 0], 6)
        + group("m1", [0, 0, 1, 0], 6)
    )
    sel = select(rows, SelectionConfig(truncated="keep", order="none", max_problems=None))
    # dist 0: w (0 trunc, len 4), z (0 trunc, len 9), y (1 trunc); dist .2: a, b; dist .25: m1, m2
    assert [p.problem_id for p in sel.problems] == ["w", "z", "y", "a", "b", "m1", "m2"]


# --------------------------------------------------------------------------- truncation


def test_truncation_mask():
    sel = select(pool(), SelectionConfig(truncated="mask", order="none"))
    # p6 -> [1,0,1,0] pass .5, dist 0 but 1 truncation -> right after p2
    assert [p.problem_id for p in sel.problems] == ["p2", "p6", "p3", "p1"]
    p6 = {r["sample_index"]: r for r in sel.rows if r["problem_id"] == "p6"}
    assert len(p6) == 4
    assert p6[3]["reward"] == 0.0 and p6[3]["mask_decision"] is True
    assert [p6[i]["mask_decision"] for i in range(3)] == [False] * 3
    assert [p6[i]["advantage"] for i in range(4)] == pytest.approx([1, -1, 1, -1], abs=TOL)
    assert sel.stats["rollouts_masked_truncated"] == 1 and sel.stats["rollouts_dropped_truncated"] == 0
    assert sel.problems[1].n_correct == 2 and sel.problems[1].n_truncated == 1


def test_truncation_keep():
    sel = select(pool(), SelectionConfig(truncated="keep", order="none"))
    # p6 -> [1,0,1,1] pass .75, dist .25; ties with p3 (len 8) and p1 (len 10), but has 1 truncation -> last
    assert [p.problem_id for p in sel.problems] == ["p2", "p3", "p1", "p6"]
    p6 = {r["sample_index"]: r for r in sel.rows if r["problem_id"] == "p6"}
    assert p6[3]["reward"] == 1.0 and p6[3]["mask_decision"] is False
    # [1,0,1,1] like p3: .577, -1.732, .577, .577
    assert [p6[i]["advantage"] for i in range(4)] == pytest.approx([INV_SQRT3, -SQRT3, INV_SQRT3, INV_SQRT3], abs=TOL)
    assert sel.stats["rollouts_kept"] == 16


def test_all_truncated_dropped_problem_is_empty():
    rows = group("t", [1, 0], 5, truncated={0, 1}) + group("p", [1, 0], 5)
    sel = select(rows, NONE)
    assert [p.problem_id for p in sel.problems] == ["p"]
    assert sel.stats["problems_empty"] == 1 and sel.stats["pass_rate_histogram"][5] == 1
    with pytest.raises(ReasonMaxxerError, match="truncated='mask'"):
        select(group("t", [1, 0], 5, truncated={0, 1}), NONE)


# --------------------------------------------------------------------------- keep_shortest


def short_pool():
    """q3 [0,1] len 3,3 (pass .5, mean 3) ranks first, q2 [1,1,0,0] len 40,45,4,5 (mean 23.5), q1 [1,0,0,0] len 5,50,6,7."""
    return (
        group("q1", [1, 0, 0, 0], [5, 50, 6, 7])
        + group("q2", [1, 1, 0, 0], [40, 45, 4, 5])
        + group("q3", [0, 1], [3, 3])
    )


def test_keep_shortest_global_then_drop_unmixed():
    sel = select(short_pool(), SelectionConfig(keep_shortest=0.7, order="none"))
    # 10 selected, keep round(7.0) = 7 shortest: q3/0 3, q3/1 3, q2/2 4, q1/0 5, q2/3 5, q1/2 6, q1/3 7;
    # cut: q2/0 40, q2/1 45, q1/1 50. q2 is left [0,0] -> no longer mixed -> dropped (2 more rows).
    assert [p.problem_id for p in sel.problems] == ["q3", "q1"]
    assert [(r["problem_id"], r["sample_index"]) for r in sel.rows] == [
        ("q3", 0),
        ("q3", 1),
        ("q1", 0),
        ("q1", 2),
        ("q1", 3),
    ]
    st = sel.stats
    assert (
        st["rollouts_dropped_length"],
        st["problems_dropped_length"],
        st["rollouts_dropped_unmixed"],
        st["rollouts_kept"],
    ) == (3, 1, 2, 5)
    # advantages recomputed on what remains: q1 [1,0,0]: mean 1/3, std .4714 -> 1.4142, -.7071, -.7071
    a = adv_of(sel)
    assert [a[("q1", i)] for i in (0, 2, 3)] == pytest.approx([SQRT2, -1 / SQRT2, -1 / SQRT2], abs=TOL)
    assert [a[("q3", i)] for i in (0, 1)] == pytest.approx([-1, 1], abs=TOL)
    # problems keep the statistics they were ranked by (before the cut)
    assert sel.problems[1].n == 4 and [r["group"] for r in sel.rows] == [0, 0, 1, 1, 1]


def test_keep_shortest_tie_and_empty():
    # 0.4 of 10 -> 4: q3/0, q3/1, q2/2 (4), then the length-5 tie q1/0 vs q2/3 goes to q1 by problem_id.
    # q2 left [0], q1 left [1]: single rollouts are not mixed -> only q3 survives.
    sel = select(short_pool(), SelectionConfig(keep_shortest=0.4, order="none"))
    assert [p.problem_id for p in sel.problems] == ["q3"] and sel.stats["rollouts_dropped_unmixed"] == 2
    # 0.1 of 10 -> 1 rollout: nothing mixed is left
    with pytest.raises(ReasonMaxxerError, match="raise keep_shortest"):
        select(short_pool(), SelectionConfig(keep_shortest=0.1, order="none"))


def test_keep_unmixed_keeps_the_trimmed_all_equal_group_with_advantage_zero():
    # the official recipe: q2 left [0, 0] by the cut stays, A = 0 on both rows (anchor only)
    sel = select(short_pool(), SelectionConfig(keep_shortest=0.7, order="none", keep_unmixed=True))
    assert [p.problem_id for p in sel.problems] == ["q3", "q2", "q1"]
    a = adv_of(sel)
    assert a[("q2", 2)] == a[("q2", 3)] == 0.0
    assert [a[("q1", i)] for i in (0, 2, 3)] == pytest.approx([SQRT2, -1 / SQRT2, -1 / SQRT2], abs=TOL)
    st = sel.stats
    assert (st["problems_dropped_length"], st["rollouts_dropped_unmixed"], st["rollouts_kept"]) == (0, 0, 7)
    # a single rollout left is kept too (0.4 -> q3 both, q2/2, q1/0)
    sel = select(short_pool(), SelectionConfig(keep_shortest=0.4, order="none", keep_unmixed=True))
    assert [p.problem_id for p in sel.problems] == ["q3", "q2", "q1"] and adv_of(sel)[("q1", 0)] == 0.0


# --------------------------------------------------------------------------- order


def test_signal_clarity():
    # entropies > 1.4 (strict): 1.5, 2.0, 1.41 -> 3 of 5; |A| = .5 -> .5 * 3/5 = .3
    assert signal_clarity(-0.5, [0.5, 1.4, 1.5, 2.0, 1.41], 1.4) == pytest.approx(0.3)
    assert signal_clarity(2.0, [], 1.4) == 0.0


def test_clarity_order():
    rows = [
        # c1 [1,0,0,0]: A = 1.732, -.577, -.577, -.577 (group 1: pass .25)
        row("c1", 0, 1, 4, ents=[2, 0, 0, 0]),  # 1.732 * 1/4 = .4330
        row("c1", 1, 0, 4, ents=[2, 2, 2, 2]),  # .577 * 4/4 = .5774
        row("c1", 2, 0, 4, ents=[0, 0, 0, 0]),  # 0
        row("c1", 3, 0, 4, ents=[1.0, 1.5, 0, 0]),  # 1.0 is not > tau: .577 * 1/4 = .1443
        # c2 [1,0]: A = +-1 (group 0: pass .5)
        row("c2", 0, 1, 2, ents=[3, 0]),  # 1 * 1/2 = .5
        row("c2", 1, 0, 2, ents=[3, 3]),  # 1 * 2/2 = 1.0
        row("c0", 0, 1, 3),  # all correct: dropped, so needs no entropies
    ]
    sel = select(rows, SelectionConfig(order="clarity"), tau=1.0)
    assert [(r["problem_id"], r["sample_index"]) for r in sel.rows] == [
        ("c2", 1),
        ("c1", 1),
        ("c2", 0),
        ("c1", 0),
        ("c1", 3),
        ("c1", 2),
    ]
    assert [r["clarity"] for r in sel.rows] == pytest.approx(
        [1.0, INV_SQRT3, 0.5, SQRT3 / 4, INV_SQRT3 / 4, 0.0], abs=TOL
    )
    with pytest.raises(ReasonMaxxerError, match="tau"):
        select(rows, SelectionConfig(order="clarity"))
    bad = copy.deepcopy(rows)
    del bad[4]["base_entropies"]
    with pytest.raises(ReasonMaxxerError, match=r"rollout row 4 .*'base_entropies'"):
        select(bad, SelectionConfig(order="clarity"), tau=1.0)
    bad[4]["base_entropies"] = [1.0]
    with pytest.raises(ReasonMaxxerError, match="1 base_entropies for 2 completion tokens"):
        select(bad, SelectionConfig(order="clarity"), tau=1.0)


def test_shuffle_seeded_permutation():
    base = select(pool(), NONE).rows
    s0 = select(pool(), SelectionConfig(seed=0)).rows
    key = lambda rs: [(r["problem_id"], r["sample_index"]) for r in rs]  # noqa: E731
    assert key(s0) == key(select(pool(), SelectionConfig(seed=0)).rows)
    assert sorted(key(s0)) == sorted(key(base)) and key(s0) != key(base)
    assert key(select(pool(), SelectionConfig(seed=1)).rows) != key(s0)


def test_random_reward_control_shuffles_labels_across_problems():
    rows = pool()
    before = copy.deepcopy(rows)
    shuffled = shuffle_rewards(rows, seed=0)
    assert rows == before  # not mutated
    assert [(r["problem_id"], r["sample_index"]) for r in shuffled] == [
        (r["problem_id"], r["sample_index"]) for r in rows
    ]
    assert sorted(r["reward"] for r in shuffled) == sorted(r["reward"] for r in rows)  # 13 correct of 24 still
    assert [r["reward"] for r in shuffled] != [r["reward"] for r in rows]
    assert shuffle_rewards(rows, 0) == shuffled and shuffle_rewards(rows, 1) != shuffled
    # 10 all-correct and 10 all-wrong problems: nothing to learn from graded rewards, but the
    # shuffled labels make problems mixed (P(a given group stays all-equal) is small)
    flat = [g for k in range(10) for g in (group(f"c{k}", [1] * 4, 5), group(f"w{k}", [0] * 4, 5))]
    rows = [r for g in flat for r in g]
    with pytest.raises(ReasonMaxxerError, match="mixed"):
        select(rows, NONE)
    sel = select(rows, SelectionConfig(order="none", rewards="shuffled", max_problems=None))
    assert sel.stats["problems_mixed"] >= 10 and sum(r["reward"] for r in rows) == 40
    with pytest.raises(ReasonMaxxerError, match="rewards"):
        SelectionConfig(rewards="random")


@pytest.mark.parametrize(
    "cfg",
    [
        SelectionConfig(),
        NONE,
        SelectionConfig(keep_shortest=0.8, truncated="mask"),
        SelectionConfig(order="none", rewards="shuffled"),
    ],
)
def test_input_order_invariance_and_purity(cfg):
    rows = pool() + short_pool()
    before = copy.deepcopy(rows)
    ref = select(rows, cfg)
    assert rows == before  # the input is not mutated
    for seed in range(3):
        perm = list(rows)
        random.Random(seed).shuffle(perm)
        got = select(perm, cfg)
        assert got.rows == ref.rows and got.problems == ref.problems and got.stats == ref.stats


def test_greedy_rows_ignored():
    # p5 is all wrong; a correct greedy completion (sample_index -1) must not make it mixed
    sel = select(pool() + [row("p5", -1, 1, 12)], NONE)
    assert "p5" not in [p.problem_id for p in sel.problems] and sel.stats["rollouts_ignored_greedy"] == 1
    with pytest.raises(ReasonMaxxerError, match="greedy"):
        select([row("p", -1, 1, 3)], NONE)


# --------------------------------------------------------------------------- errors


def test_no_mixed_problem_error_message():
    rows = group("a", [0, 0, 0], 5) + group("b", [0, 0, 0], 5) + group("c", [0, 0], 5) + group("d", [1, 1], 5)
    with pytest.raises(ReasonMaxxerError) as e:
        select(rows, NONE)
    msg = str(e.value)
    first, *rest = msg.splitlines()
    assert "3 all-wrong, 0 mixed, 1 all-correct of 4 problems" in first
    assert "--n" in first and "temperature" in first and "closer to the model's level" in first
    assert "histogram" in rest[0]
    assert rest[1].startswith("  [0.0, 0.1)") and rest[1].rstrip().endswith(" 3")
    assert rest[10].startswith("  [0.9, 1.0]") and rest[10].rstrip().endswith(" 1")
    with pytest.raises(ReasonMaxxerError, match="no rollout rows"):
        select([], NONE)


def test_bad_rows():
    rows = pool()
    del rows[2]["reward"]
    with pytest.raises(ReasonMaxxerError, match=r"rollout row 2: missing key 'reward'"):
        select(rows, NONE)
    rows = pool()
    rows[5]["reward"] = 0.5
    with pytest.raises(ReasonMaxxerError, match=r"rollout row 5: 'reward' must be 1.0"):
        select(rows, NONE)
    rows = pool()
    rows[7] = dict(rows[6])
    with pytest.raises(ReasonMaxxerError, match=r"rollout row 7: duplicate .* row 6"):
        select(rows, NONE)
    with pytest.raises(ReasonMaxxerError, match="rollout row 0: missing key 'problem_id'"):
        problem_stats([{"sample_index": 0}])


@pytest.mark.parametrize(
    "kw",
    [{"keep_shortest": 0.0}, {"keep_shortest": 1.5}, {"truncated": "clip"}, {"order": "random"}, {"max_problems": 0}],
)
def test_bad_config(kw):
    with pytest.raises(ReasonMaxxerError, match="SelectionConfig"):
        SelectionConfig(**kw)


# --------------------------------------------------------------------------- helpers


def test_problem_stats():
    st = {s.problem_id: s for s in problem_stats(pool())}
    assert list(st) == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert st["p6"] == ProblemStats("p6", n=4, n_correct=3, pass_rate=0.75, n_truncated=1, mean_length=30.0)
    assert st["p1"].pass_rate == 0.25 and st["p1"].mean_length == 10.0


def test_pass_rate_histogram_and_format():
    s = lambda c, n: ProblemStats("x", n, c, c / n if n else math.nan, 0, 1.0)  # noqa: E731
    # 3/10 -> bin 3 exactly (0.3 * 10 in floats is 3.0000000000000004, fine either way), 7/10 -> 7,
    # 1/1 -> last bin, 0/4 -> bin 0, 29/100 -> bin 2, n == 0 not counted
    hist = pass_rate_histogram([s(3, 10), s(7, 10), s(1, 1), s(0, 4), s(29, 100), s(0, 0)])
    assert hist == [1, 0, 1, 1, 0, 0, 0, 1, 0, 1]
    assert pass_rate_histogram([s(1, 2)], bins=2) == [0, 1]
    text = format_histogram([4, 0, 2])
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("  [0.0, 0.3)") and lines[0].count("#") == 30 and lines[0].endswith(" 4")
    assert lines[1].count("#") == 0 and lines[2].count("#") == 15 and lines[2].startswith("  [0.7, 1.0]")
