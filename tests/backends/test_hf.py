"""The HF sampler: exact greedy equality with HF generate, per-token statistics, seeding."""

import pytest
import torch
from conftest import make_tiny_model

from reasonmaxxer.backends.hf import (
    HFSampler,
    Request,
    SamplingConfig,
    request_seed,
    sample_from_logits,
)
from reasonmaxxer.core.entropy import entropy_and_logprob

PREFIX = "Solve the following problem. Problem: "
QUESTIONS = ["1+2?", "what is 33 + 4?", "abc", "x" * 30, "9*9=", "Tom has 3 apples."]


@pytest.fixture(scope="module")
def peaky_model(tiny_tokenizer):
    """A tiny model whose greedy outputs vary from token to token."""
    return make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2)


def _requests(tok, questions=QUESTIONS):
    return [Request((f"p{i}", 0), tuple(tok(PREFIX + q)["input_ids"])) for i, q in enumerate(questions)]


def _hf_greedy(model, ids, max_new, eos):
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=eos
    )
    return out[0, x.shape[1] :].tolist()


@pytest.mark.parametrize("batch_size", [1, 2, 4, 32])
def test_greedy_equals_hf_generate(peaky_model, tiny_tokenizer, batch_size):
    reqs = _requests(tiny_tokenizer)
    sampler = HFSampler(peaky_model, tiny_tokenizer)
    out = sampler.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=batch_size))
    varied = 0
    for r, c in zip(reqs, out):
        ref = _hf_greedy(peaky_model, r.prompt_ids, 24, tiny_tokenizer.eos_token_id)
        assert c.token_ids == ref, (r.key, c.token_ids, ref)
        varied += len(set(c.token_ids)) > 3
    assert varied >= 3  # the reference is not a degenerate repetition


def test_eos_stops_rows_at_different_lengths(peaky_model, tiny_tokenizer):
    reqs = _requests(tiny_tokenizer)
    sampler = HFSampler(peaky_model, tiny_tokenizer)
    free = sampler.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=3))
    eos_tok = free[0].token_ids[5]  # pretend this token is EOS: rows now end at different steps
    sampler.eos = {eos_tok}
    out = sampler.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=3))
    lengths = set()
    for r, c in zip(reqs, out):
        ref = _hf_greedy(peaky_model, r.prompt_ids, 24, eos_tok)
        assert c.token_ids == ref
        assert c.finish_reason == ("eos" if eos_tok in ref else "length")
        lengths.add(len(c.token_ids))
    assert len(lengths) >= 2 and out[0].finish_reason == "eos" and len(out[0].token_ids) <= 6


def test_recorded_logprobs_and_entropies_match_teacher_forcing(peaky_model, tiny_tokenizer):
    reqs = _requests(tiny_tokenizer)[:3]
    out = HFSampler(peaky_model, tiny_tokenizer).generate(
        reqs, SamplingConfig(n=1, temperature=1.0, max_new_tokens=16, batch_size=2, seed=5)
    )
    for r, c in zip(reqs, out):
        ids = torch.tensor([list(r.prompt_ids) + c.token_ids])
        with torch.no_grad():
            logits = peaky_model(ids).logits[0].float()
        P = len(r.prompt_ids)
        steps = logits[P - 1 : P - 1 + len(c.token_ids)]  # logits predicting each generated token
        ent, lp = entropy_and_logprob(steps, torch.tensor(c.token_ids))
        assert torch.allclose(ent, torch.tensor(c.entropies), atol=1e-4)
        assert torch.allclose(lp, torch.tensor(c.logprobs), atol=1e-4)


def test_seeded_samples_do_not_depend_on_batch_composition(peaky_model, tiny_tokenizer):
    reqs = _requests(tiny_tokenizer)
    s = HFSampler(peaky_model, tiny_tokenizer)
    runs = [
        s.generate(reqs, SamplingConfig(n=1, temperature=1.0, max_new_tokens=16, batch_size=b, seed=11))
        for b in (1, 2, 6)
    ]
    for a, b in zip(runs[0], runs[1]):
        assert a.token_ids == b.token_ids
    for a, b in zip(runs[0], runs[2]):
        assert a.token_ids == b.token_ids
    # a request alone gives the same completion as inside the full batch
    alone = s.generate(reqs[2:3], SamplingConfig(n=1, temperature=1.0, max_new_tokens=16, batch_size=6, seed=11))
    assert alone[0].token_ids == runs[2][2].token_ids
    other_seed = s.generate(reqs, SamplingConfig(n=1, temperature=1.0, max_new_tokens=16, batch_size=6, seed=12))
    assert any(a.token_ids != b.token_ids for a, b in zip(runs[0], other_seed))


def test_request_seed_is_stable_and_distinct():
    assert request_seed(0, "p1", 0) == request_seed(0, "p1", 0)
    assert len({request_seed(0, "p1", i) for i in range(100)} | {request_seed(1, "p1", 0)}) == 101
    assert 0 <= request_seed(3, "x", 7) < 2**63


def test_sample_from_logits_filters_and_frequencies():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    # greedy and top_k=1 and a tiny top_p all give the argmax
    assert sample_from_logits(logits, torch.tensor([0.0]), 0).item() == 3
    for u in (0.0, 0.5, 0.999):
        assert sample_from_logits(logits, torch.tensor([u]), 1.0, top_k=1).item() == 3
        assert sample_from_logits(logits, torch.tensor([u]), 1.0, top_p=0.01).item() == 3
    # inverse CDF at T=1: cdf = [.1, .3, .6, 1.0]
    us = torch.tensor([0.05, 0.15, 0.29, 0.31, 0.59, 0.61, 0.99])
    got = sample_from_logits(logits.expand(len(us), 4), us, 1.0).tolist()
    assert got == [0, 1, 1, 2, 2, 3, 3]
    # top_p = 0.5 keeps {3 (0.4), 2 (0.3)}: renormalised [3: 4/7, 2: 3/7], sorted order 3 then 2
    got = sample_from_logits(logits.expand(2, 4), torch.tensor([0.5, 0.6]), 1.0, top_p=0.5).tolist()
    assert got == [3, 2]
    # top_k = 2 keeps tokens 2 and 3 (vocabulary order: cdf [.3/.7, 1])
    got = sample_from_logits(logits.expand(2, 4), torch.tensor([0.42, 0.43]), 1.0, top_k=2).tolist()
    assert got == [2, 3]


def test_bad_config_is_a_clear_error():
    from reasonmaxxer.errors import ReasonMaxxerError

    with pytest.raises(ReasonMaxxerError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ReasonMaxxerError, match="top_p"):
        SamplingConfig(top_p=0)
