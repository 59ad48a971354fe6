"""Tests for reasonmaxxer.losses, each against values worked out by hand in the comments."""

import math

import pytest
import torch

from reasonmaxxer.core.entropy import token_logprobs
from reasonmaxxer.core.losses import (
    LOSS_VARIANTS,
    anchor_kl,
    decision_loss,
    group_advantages,
    loss_masks,
    masked_sum_and_count,
    reasonmaxxer_loss,
    register_loss,
)
from reasonmaxxer.errors import ReasonMaxxerError

EPS = 1e-6

# ---------------------------------------------------------------- group_advantages


def test_group_advantages_hand_values():
    # group 0: rewards (1, 0, 0, 1): mean 0.5, population std sqrt(((.5)^2 * 4) / 4) = 0.5
    #   A = (+-0.5) / (0.5 + 1e-6) = +-0.999998
    # group 1: (1, 1, 1): std 0 -> A = 0 exactly
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    a = 0.5 / (0.5 + EPS)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0])
    adv = group_advantages(rewards, groups)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, atol=1e-7, rtol=0)
    assert (adv[4:] == 0).all()


def test_group_advantages_clip_one_correct_out_of_20():
    # mean 0.05, std sqrt(0.05 * 0.95) = 0.217945
    # correct: 0.95 / 0.217945 = 4.3589 -> clipped to 2.5
    # incorrect: -0.05 / 0.217945 = -0.229416 (not clipped)
    rewards = torch.zeros(20)
    rewards[7] = 1.0
    adv = group_advantages(rewards, torch.zeros(20, dtype=torch.long))
    std = math.sqrt(0.05 * 0.95)
    assert 0.95 / std == pytest.approx(4.3589, abs=1e-4)
    assert adv[7].item() == pytest.approx(2.5)
    torch.testing.assert_close(adv[:7], torch.full((7,), -0.05 / (std + EPS)), atol=1e-6, rtol=0)
    assert group_advantages(rewards, torch.zeros(20, dtype=torch.long), clip=10.0)[7].item() == pytest.approx(
        0.95 / (std + EPS), abs=1e-5
    )


def test_group_advantages_unsorted_noncontiguous_ids_and_fractional_equal_rewards():
    # ids 7 and 3 interleaved; group 7 = (0, 1) -> mean .5, std .5 -> (-1, +1); group 3 = (0.1, 0.1, 0.1) -> 0
    rewards = torch.tensor([0.0, 0.1, 1.0, 0.1, 0.1])
    groups = torch.tensor([7, 3, 7, 3, 3])
    a = 0.5 / (0.5 + EPS)
    assert group_advantages(rewards, groups).tolist() == pytest.approx([-a, 0, a, 0, 0], abs=1e-7)
    assert (group_advantages(rewards, groups)[[1, 3, 4]] == 0).all()  # exactly 0, not 1e-11
    with pytest.raises(ValueError):
        group_advantages(rewards, groups[:3])
    with pytest.raises(ReasonMaxxerError):
        group_advantages(torch.tensor([0.0, math.nan]), torch.tensor([0, 0]))


# ---------------------------------------------------------------- decision loss

LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -2.0]])
ADV = torch.tensor([1.0, -1.0])
GATE = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)


def test_masked_sum_and_count_ignores_nan_outside_mask():
    values = torch.tensor([[1.0, math.nan], [2.0, 3.0]])
    s, n = masked_sum_and_count(values, torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))
    assert s.item() == 6.0 and n == 3


def test_decision_loss_2x3_hand_value():
    # gated: (0,0): A=+1, lp=-1 -> -1 ; (0,2): +1 * -3 -> -3 ; (1,1): -1 * -1 -> +1
    # sum = -3, three gated positions -> loss = -(-3)/3 = 1.0
    assert decision_loss(LOGP, ADV, GATE).item() == pytest.approx(1.0)
    # with a global denominator of 6 (e.g. the whole step): 3/6 = 0.5
    assert decision_loss(LOGP, ADV, GATE, denom=6).item() == pytest.approx(0.5)
    # gradient: d loss / d lp = -A_b / denom at gated positions, 0 elsewhere
    lp = LOGP.clone().requires_grad_()
    decision_loss(lp, ADV, GATE).backward()
    expected = torch.tensor([[-1 / 3, 0, -1 / 3], [0, 1 / 3, 0]])
    torch.testing.assert_close(lp.grad, expected, atol=1e-7, rtol=0)


def test_decision_loss_empty_gate_is_zero_and_shapes_checked():
    assert decision_loss(LOGP, ADV, torch.zeros_like(GATE)).item() == 0.0
    with pytest.raises(ValueError):
        decision_loss(LOGP, torch.tensor([1.0, 2.0, 3.0]), GATE)
    with pytest.raises(ValueError):
        decision_loss(LOGP, ADV, GATE, denom=0)


# ---------------------------------------------------------------- anchor KL

# position 0: p_base = (1/2, 1/4, 1/4), p_theta uniform (1/3 each)
#   KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8) = 0.0588915
# position 1: p_base = p_theta = (0.7, 0.2, 0.1) -> KL = 0
KL0 = 0.5 * math.log(9 / 8)
P_BASE = torch.tensor([[[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]])  # [1, 2, 3]
P_THETA = torch.tensor([[[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]]])


def test_anchor_kl_hand_values():
    base, theta = P_BASE.log(), P_THETA.log() + 5.0  # logits, any shift
    both = torch.ones(1, 2, dtype=torch.bool)
    assert KL0 == pytest.approx(0.0588915, abs=1e-7)
    assert anchor_kl(base, theta, both).item() == pytest.approx(KL0 / 2, abs=1e-7)  # mean over 2
    assert anchor_kl(base, theta, torch.tensor([[True, False]])).item() == pytest.approx(KL0, abs=1e-7)
    assert anchor_kl(base, base.clone(), both).item() == pytest.approx(0.0, abs=1e-7)  # KL(p||p) = 0
    assert anchor_kl(base, theta, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
    # bf16 inputs: fp32 math on the rounded logits
    assert anchor_kl(base.bfloat16(), theta.bfloat16(), both).item() == pytest.approx(KL0 / 2, abs=1e-2)


def test_anchor_kl_gradient_flows_to_theta_only_hand_value():
    # d KL / d theta_logits = p_theta - p_base; mean over 2 positions halves it:
    # position 0: ((1/3 - 1/2), (1/3 - 1/4), (1/3 - 1/4)) / 2 = (-1/12, 1/24, 1/24); position 1: 0
    base = P_BASE.log().requires_grad_()
    theta = P_THETA.log().requires_grad_()
    anchor_kl(base, theta, torch.ones(1, 2, dtype=torch.bool)).backward()
    expected = torch.tensor([[[-1 / 12, 1 / 24, 1 / 24], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(theta.grad, expected, atol=1e-7, rtol=0)
    assert base.grad is None


def test_anchor_kl_matches_autograd_reference_chunked():
    torch.manual_seed(0)
    base = torch.randn(3, 5, 11) * 3
    theta = torch.randn(3, 5, 11, requires_grad=True)
    mask = torch.rand(3, 5) < 0.6
    w = 2.5
    ref = (base.softmax(-1) * (base.log_softmax(-1) - theta.log_softmax(-1))).sum(-1)[mask].mean()
    (ref * w).backward()
    g_ref = theta.grad.clone()
    theta.grad = None
    for chunk in (1, 4, 128):
        ours = anchor_kl(base, theta, mask, chunk_size=chunk)
        (ours * w).backward()
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(theta.grad, g_ref, atol=1e-6, rtol=0)
        theta.grad = None
    # double precision passes torch's numerical gradient check
    th = theta.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: anchor_kl(base.double(), t, mask, chunk_size=4), (th,))


# ---------------------------------------------------------------- total, variants


def test_total_with_lambda_hand_value():
    # B=2, T=3, V=3. decision: the 2x3 example above -> 1.0
    # anchor positions (0,1), (1,0), (1,2): KL0 at (0,1), 0 at the others -> KL0 / 3 = 0.0196305
    # total = 1.0 + 0.2 * 0.0196305 = 1.0039261
    base = torch.full((2, 3, 3), 1.0 / 3).log()
    theta = base.clone()
    base[0, 1] = P_BASE[0, 0].log()  # (1/2, 1/4, 1/4) vs uniform theta
    anchor = torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    loss, stats = reasonmaxxer_loss(
        token_logprob=LOGP, logits_theta=theta, logits_base=base, advantages=ADV, gate=GATE, anchor_mask=anchor, lam=0.2
    )
    assert loss.item() == pytest.approx(1.0 + 0.2 * KL0 / 3, abs=1e-6)
    # diagnostics over the gated (0,0) lp -1, (0,2) lp -3 (A = 1) and (1,1) lp -1 (A = -1):
    # pos pressure 1*1 + 1*3 = 4, neg pressure 1*1 = 1; no base log-probs -> no Delta-logp
    assert stats == pytest.approx(
        {
            "loss": 1.0 + 0.2 * KL0 / 3,
            "decision": 1.0,
            "anchor": KL0 / 3,
            "gated_tokens": 3,
            "anchor_tokens": 3,
            "pos_pressure": 4.0,
            "neg_pressure": 1.0,
            "dlogp_pos_sum": 0.0,
            "dlogp_pos_tokens": 0,
            "dlogp_neg_sum": 0.0,
            "dlogp_neg_tokens": 0,
        },
        abs=1e-6,
    )
    loss0, stats0 = reasonmaxxer_loss(
        token_logprob=LOGP, logits_theta=theta, logits_base=base, advantages=ADV, gate=GATE, anchor_mask=anchor, lam=0.0
    )
    assert loss0.item() == pytest.approx(1.0) and stats0["anchor_tokens"] == 0


# Rows: 0 = correct (A>0), 1 = incorrect (A<0). T = 5: row 0 = prompt 2 + completion 3;
# row 1 = 1 left pad + prompt 1 + completion 3.
ATTN = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
COMP = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
G5 = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)  # (0,1) is a prompt position
A5 = torch.tensor([1.5, -0.5])
# valid predictions (token t and t-1 real): row 0 cols 1-4, row 1 cols 2-4


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_variant_masks_by_hand():
    m = loss_masks("reasonmaxxer", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # decision = gate & completion & valid: (0,2), (0,4), (1,3); the prompt-position gate bit is dropped
    assert torch.equal(m.decision, _m([[0, 0, 1, 0, 1], [0, 0, 0, 1, 0]]))
    # anchor = valid & ~decision: row 0 cols 1, 3; row 1 cols 2, 4 (col 1 of row 1 has a pad predecessor)
    assert torch.equal(m.anchor, _m([[0, 1, 0, 1, 0], [0, 0, 1, 0, 1]]))
    assert m.lam == 0.2 and torch.equal(m.advantages, A5)

    p = loss_masks("positive_only", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # row 1 (A<0) drops out of both terms; its advantage becomes 0
    assert torch.equal(p.decision, _m([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]))
    assert torch.equal(p.anchor, _m([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]))
    assert p.advantages.tolist() == [1.5, 0.0]

    n = loss_masks("no_anchor", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    assert n.lam == 0.0 and not n.anchor.any() and torch.equal(n.decision, m.decision)

    a = loss_masks("all_tokens", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # decision = every valid completion position; anchor = valid prompt positions: (0,1) only
    assert torch.equal(a.decision, _m([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]))
    assert torch.equal(a.anchor, _m([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))

    r = loss_masks("rft", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # SFT on the correct row only: every valid completion position of row 0, weight 1, no anchor
    assert torch.equal(r.decision, _m([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]))
    assert not r.anchor.any() and r.lam == 0.0 and r.advantages.tolist() == [1.0, 0.0]

    with pytest.raises(ReasonMaxxerError, match="all_tokens"):
        loss_masks("grpo", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    assert set(LOSS_VARIANTS) >= {"reasonmaxxer", "positive_only", "no_anchor", "all_tokens"}
    with pytest.raises(ValueError):
        register_loss("reasonmaxxer")(lambda **k: None)


def test_positive_only_decision_loss_by_hand():
    # token logprobs; gated (after positive_only) = (0,2) and (0,4) with A = 1.5
    lp = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0], [0.0, -1.0, -1.0, -7.0, -1.0]])
    p = loss_masks("positive_only", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # -(1.5 * -2 + 1.5 * -4) / 2 = 4.5 ; row 1's (1,3) (A=-0.5, lp=-7) excluded from sum and count
    assert decision_loss(lp, p.advantages, p.decision).item() == pytest.approx(4.5)
    m = loss_masks("reasonmaxxer", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # reasonmaxxer: -(1.5*-2 + 1.5*-4 + (-0.5)*(-7)) / 3 = -(-3 - 6 + 3.5)/3 = 5.5/3
    assert decision_loss(lp, m.advantages, m.decision).item() == pytest.approx(5.5 / 3)


def test_micro_batch_split_invariance_of_loss_and_grads():
    # One batch of 4 rows vs micro-batches of rows {0, 1} and {2, 3} with the step's global
    # denominators: sum of the micro-batch losses == the whole-batch loss, and grads match.
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 7, 13
    ids = torch.randint(0, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :2] = 0  # left padding
    attn[3, :1] = 0
    comp = torch.zeros(B, T, dtype=torch.bool)
    comp[:, 3:] = True
    entropy_gate = torch.rand(B, T, generator=g) > 0.6
    adv = torch.tensor([1.2, -0.8, 0.4, -2.5])
    base = torch.randn(B, T, V, generator=g)
    theta = torch.randn(B, T, V, generator=g).requires_grad_()

    def run(rows, masks, dec_denom, anc_denom):
        logits = theta[rows][:, :-1]  # [b, T-1, V], row t-1 predicts token t
        lp = token_logprobs(logits, ids[rows][:, 1:])
        return reasonmaxxer_loss(
            token_logprob=lp,
            logits_theta=logits,
            logits_base=base[rows][:, :-1],
            advantages=masks.advantages,
            gate=masks.decision[:, 1:],
            anchor_mask=masks.anchor[:, 1:],
            lam=masks.lam,
            dec_denom=dec_denom,
            anc_denom=anc_denom,
            chunk_size=5,
        )

    for variant in ("reasonmaxxer", "positive_only", "all_tokens"):

        def masks_of(rows):
            return loss_masks(
                variant,  # noqa: B023 (called inside this iteration)
                gate=entropy_gate[rows],
                completion_mask=comp[rows],
                attention_mask=attn[rows],
                advantages=adv[rows],
            )

        everything = [0, 1, 2, 3]
        whole_masks = masks_of(everything)
        loss_all, stats_all = run(everything, whole_masks, None, None)  # local counts == global
        theta.grad = None
        loss_all.backward()
        g_all = theta.grad.clone()

        micro = [[0, 1], [2, 3]]
        mm = [masks_of(r) for r in micro]
        dec_denom = sum(int(m.decision.sum()) for m in mm)
        anc_denom = sum(int(m.anchor.sum()) for m in mm)
        assert dec_denom == stats_all["gated_tokens"] and anc_denom == stats_all["anchor_tokens"]
        theta.grad = None
        total = 0.0
        dec_sum = 0.0
        for r, m in zip(micro, mm):
            loss, stats = run(r, m, dec_denom, anc_denom)
            loss.backward()  # accumulates into theta.grad
            total += loss.item()
            dec_sum += stats["decision"]
        assert total == pytest.approx(loss_all.item(), abs=1e-6)
        assert dec_sum == pytest.approx(stats_all["decision"], abs=1e-6)
        torch.testing.assert_close(theta.grad, g_all, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- per-sequence normalisation


def test_per_sequence_normalisation_hand_values():
    # LOGP/ADV/GATE above: row 0 gated (0,0) lp -1, (0,2) lp -3, A = 1; row 1 gated (1,1) lp -1, A = -1.
    # per_sequence with S = 2 sequences: row b's denominator is S * its own gated count.
    #   row 0 mean: -(1*-1 + 1*-3)/2 = 2 ; row 1 mean: -(-1*-1)/1 = -1 ; step mean (2 - 1)/2 = 0.5
    # (per_token: -(-1 - 3 + 1)/3 = 1.0)
    d = torch.tensor([2 * 2.0, 2 * 1.0])
    assert decision_loss(LOGP, ADV, GATE, denom=d).item() == pytest.approx(0.5)
    assert decision_loss(LOGP, ADV, GATE).item() == pytest.approx(1.0)
    # anchor: row 0 anchors (0,1) with KL0, row 1 anchors (1,0) and (1,2) with KL 0:
    #   row means KL0/1 and 0/2, step mean (KL0 + 0)/2 = KL0/2 (per_token: KL0/3)
    base = torch.full((2, 3, 3), 1.0 / 3).log()
    theta = base.clone().requires_grad_()
    base[0, 1] = P_BASE[0, 0].log()
    anchor = torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    a = torch.tensor([2 * 1.0, 2 * 2.0])
    kl = anchor_kl(base, theta, anchor, denom=a, chunk_size=2)
    assert kl.item() == pytest.approx(KL0 / 2, abs=1e-7)
    # gradient: row 0 position (0,1) carries weight 1/2, the others 1/4 (and KL 0 -> grad 0)
    kl.backward()
    expected = torch.zeros(2, 3, 3)
    expected[0, 1] = (torch.softmax(theta.detach()[0, 1], -1) - P_BASE[0, 0]) / 2
    torch.testing.assert_close(theta.grad, expected, atol=1e-7, rtol=0)
    loss, stats = reasonmaxxer_loss(
        token_logprob=LOGP,
        logits_theta=theta.detach(),
        logits_base=base,
        advantages=ADV,
        gate=GATE,
        anchor_mask=anchor,
        lam=0.2,
        dec_denom=d,
        anc_denom=a,
    )
    assert loss.item() == pytest.approx(0.5 + 0.2 * KL0 / 2, abs=1e-6)
    assert stats["decision"] == pytest.approx(0.5) and stats["anchor"] == pytest.approx(KL0 / 2, abs=1e-7)
    with pytest.raises(ValueError, match="denom"):
        decision_loss(LOGP, ADV, GATE, denom=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="denom"):
        anchor_kl(base, theta.detach(), anchor, denom=torch.ones(3))


def test_per_sequence_row_without_gated_token_counts_in_the_mean():
    # official: a sequence with no decision token contributes decision 0 and still counts in S
    # (scripts/train_reasonmaxxer.py:1131-1132, 1183). Row 1 ungated: (2 + 0) / 2 = 1.
    gate = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    d = torch.tensor([2 * 2.0, 2 * 1.0])  # row 1: S * max(1, 0)
    assert decision_loss(LOGP, ADV, gate, denom=d).item() == pytest.approx(1.0)


def test_decision_diagnostics_hand_values():
    from reasonmaxxer.core.losses import decision_diagnostics

    lp = torch.tensor([-1.0, -3.0, -1.0, -2.0])
    base_lp = torch.tensor([-2.0, -3.5, -0.5, -2.0])
    adv = torch.tensor([1.0, 0.5, -2.0, 0.0])  # the A = 0 position counts nowhere
    d = decision_diagnostics(lp, adv, base_lp)
    # Delta-logp+: (-1 - -2) + (-3 - -3.5) = 1.5 over 2; Delta-logp-: (-1 - -0.5) = -0.5 over 1
    # pos pressure 1*1 + 0.5*3 = 2.5; neg pressure 2*1 = 2
    assert d == pytest.approx(
        {
            "dlogp_pos_sum": 1.5,
            "dlogp_pos_tokens": 2,
            "dlogp_neg_sum": -0.5,
            "dlogp_neg_tokens": 1,
            "pos_pressure": 2.5,
            "neg_pressure": 2.0,
        }
    )
    assert decision_diagnostics(lp, adv, None)["dlogp_pos_tokens"] == 0


def test_positive_only_paper_and_zero_advantage_rows_by_hand():
    # rows: 0 correct A>0, 1 incorrect A<0 (G5/COMP/ATTN/A5 above)
    p = loss_masks(
        "positive_only_paper",
        gate=G5,
        completion_mask=COMP,
        attention_mask=ATTN,
        advantages=A5,
        correct=torch.tensor([True, False]),
    )
    # the incorrect row is dropped from both terms; the correct one trains with A = 1, not 1.5
    assert torch.equal(p.decision, _m([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]))
    assert torch.equal(p.anchor, _m([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]))
    assert p.advantages.tolist() == [1.0, 0.0]
    # an all-correct group (A = 0 from group_advantages) is kept with A = 1 (official --positive_only)
    q = loss_masks(
        "positive_only_paper",
        gate=G5,
        completion_mask=COMP,
        attention_mask=ATTN,
        advantages=torch.zeros(2),
        correct=torch.tensor([True, True]),
    )
    assert q.advantages.tolist() == [1.0, 1.0] and torch.equal(q.decision[1], _m([0, 0, 0, 1, 0]))
    with pytest.raises(ReasonMaxxerError, match="correct"):
        loss_masks("positive_only_paper", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=A5)
    # reasonmaxxer: a row with A == 0 has no decision term; its gated positions are anchored
    # (official decision mask gate & A != 0, KL over the rest)
    z = loss_masks(
        "reasonmaxxer", gate=G5, completion_mask=COMP, attention_mask=ATTN, advantages=torch.tensor([1.5, 0.0])
    )
    assert torch.equal(z.decision, _m([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]))
    assert torch.equal(z.anchor, _m([[0, 1, 0, 1, 0], [0, 0, 1, 1, 1]]))
