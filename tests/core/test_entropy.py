"""core.entropy: the sampler's per-row entropy / log-prob against hand-computed values."""

import math

import torch

from reasonmaxxer.core.entropy import entropy_and_logprob, token_entropy


def test_entropy_and_logprob_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -1e9]])
    ent, lp = entropy_and_logprob(logits, torch.tensor([1, 0]))
    assert torch.allclose(ent, torch.tensor([math.log(4), 1.5 * math.log(2)]), atol=1e-6)
    assert torch.allclose(lp, torch.tensor([math.log(0.25), math.log(0.5)]), atol=1e-6)


def test_entropy_and_logprob_masked_logits_are_probability_zero():
    # top-k masking leaves -inf logits: p = [1/2, 1/4, 1/4, 0] -> H = 1.5 ln 2, not NaN
    inf = float("inf")
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25), -inf], [0.0, -inf, -inf, -inf]])
    ent, lp = entropy_and_logprob(logits, torch.tensor([2, 0]))
    assert not ent.isnan().any() and not lp.isnan().any()
    assert torch.allclose(ent, torch.tensor([1.5 * math.log(2), 0.0]), atol=1e-6)
    assert torch.allclose(lp, torch.tensor([math.log(0.25), 0.0]), atol=1e-6)
    # agrees with the scoring stage's entropy (entropy_logprob_inplace) to fp32 rounding
    assert torch.allclose(ent, token_entropy(logits), atol=1e-6)


def test_entropy_and_logprob_does_not_modify_input():
    logits = torch.randn(3, 7, dtype=torch.bfloat16)
    before = logits.clone()
    ent, lp = entropy_and_logprob(logits, torch.tensor([0, 3, 6]))
    assert torch.equal(logits, before) and ent.dtype == lp.dtype == torch.float32
