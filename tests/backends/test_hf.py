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


def test_greedy_config_resets_top_p_and_top_k():
    """temperature 0: top_p/top_k do not apply, so they are 1.0/0 whatever was asked (one
    greedy config, one store hash); a sampled config keeps them."""
    g = SamplingConfig(temperature=0, top_p=0.95, top_k=20)
    assert (g.top_p, g.top_k) == (1.0, 0) and g == SamplingConfig(temperature=0)
    s = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20)
    assert (s.top_p, s.top_k) == (0.95, 20)


def test_stop_string_ends_a_row_and_is_cut_from_text_and_tokens(peaky_model, tiny_tokenizer):
    reqs = _requests(tiny_tokenizer)
    s = HFSampler(peaky_model, tiny_tokenizer)
    s.eos = set()  # only the stop string (or the length cap) ends a row
    free = s.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=3))
    stop = free[1].text[6:9]  # a 3-character string row 1 writes (one token per character, no specials)
    out = s.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=3, stop=(stop,)))
    n_stopped = 0
    for f, c in zip(free, out):
        if stop not in f.text:
            assert (c.token_ids, c.finish_reason) == (f.token_ids, "length")
            continue
        n_stopped += 1
        cut = f.text.index(stop)
        assert c.finish_reason == "stop" and not c.truncated
        assert c.text == f.text[:cut] and stop not in c.text
        k = len(c.token_ids)  # the stop string's tokens are gone, the ones before it kept
        assert k < len(f.token_ids) and c.token_ids == f.token_ids[:k]
        assert tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
        assert c.logprobs == f.logprobs[:k] and c.entropies == f.entropies[:k]
    assert n_stopped >= 1 and out[1].token_ids == free[1].token_ids[:6]


def test_cut_at_stop_drops_a_token_that_straddles_the_stop_string():
    from reasonmaxxer.backends.hf import Completion, cut_at_stop

    class Tok:
        pieces = {1: "The answer is 7.", 2: "\nProb", 3: "lem:", 4: " 5"}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids)

    c = Completion(("p", 0), [1, 2, 3, 4], [-1.0, -2.0, -3.0, -4.0], [0.1, 0.2, 0.3, 0.4], "stop", "")
    got = cut_at_stop(Tok(), c, ("Problem:",))
    assert (got.text, got.token_ids, got.logprobs, got.entropies) == ("The answer is 7.\n", [1], [-1.0], [0.1])
    assert cut_at_stop(Tok(), got, ("Problem:",)) == got  # idempotent
    eos = Completion(("p", 0), [1, 2, 3], [0.0] * 3, None, "eos", "x")
    assert cut_at_stop(Tok(), eos, ("Problem:",)) is eos  # only a stop-string ending is cut


def test_generation_config_eos_list_ends_rows(peaky_model, tiny_tokenizer):
    """Chat end-of-turn tokens (e.g. <|im_end|>, <|eot_id|>) listed in generation_config.eos_token_id."""
    import copy

    reqs = _requests(tiny_tokenizer)
    base = HFSampler(peaky_model, tiny_tokenizer)
    base.eos = set()
    free = base.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=3))
    turn_end = free[0].token_ids[4]
    model = copy.deepcopy(peaky_model)
    model.generation_config.eos_token_id = [2, turn_end]  # a list, as chat models ship it
    s = HFSampler(model, tiny_tokenizer)
    assert s.eos == {2, turn_end, tiny_tokenizer.eos_token_id}
    out = s.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=3))
    assert out[0].finish_reason == "eos" and out[0].token_ids == free[0].token_ids[:5]
    for f, c in zip(free, out):
        ends = [i for i, t in enumerate(f.token_ids) if t in s.eos]
        assert c.token_ids == (f.token_ids[: ends[0] + 1] if ends else f.token_ids)


@pytest.mark.parametrize("batch_size", [2, 6])
def test_context_limit_is_per_row(peaky_model, tiny_tokenizer, batch_size):
    """A row whose prompt + completion fill max_position_embeddings ends (truncated); the others go on."""
    reqs = _requests(tiny_tokenizer)
    s = HFSampler(peaky_model, tiny_tokenizer)
    s.eos = set()
    free = s.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=batch_size))
    longest = max(len(r.prompt_ids) for r in reqs)
    s.max_positions = longest + 6
    out = s.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=24, batch_size=batch_size))
    n_capped = 0
    for r, f, c in zip(reqs, free, out):
        room = s.max_positions - len(r.prompt_ids)  # completion tokens that fit in the context
        assert c.token_ids == f.token_ids[:room] and c.finish_reason == "length" and c.truncated
        n_capped += room < 24
        assert len(r.prompt_ids) + len(c.token_ids) <= s.max_positions
    assert n_capped >= 1 and any(len(c.token_ids) == 24 for c in out)  # short prompts ran to max_new_tokens


def test_bf16_model_samples_from_fp32_logits(tiny_tokenizer):
    """A bf16 model's head runs in fp32 on its hidden states (as in scoring); an fp32 model keeps
    the plain path. Recorded entropies and log-probs are those of the fp32-head logits."""
    fp32 = make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2)
    assert HFSampler(fp32, tiny_tokenizer)._w32 is None
    bf = make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2).to(torch.bfloat16)
    sampler = HFSampler(bf, tiny_tokenizer)
    assert sampler._w32 is not None and sampler._w32.dtype == torch.float32
    reqs = _requests(tiny_tokenizer)[:1]
    (c,) = sampler.generate(reqs, SamplingConfig(n=1, temperature=0, max_new_tokens=6, batch_size=1))
    ids = torch.tensor([list(reqs[0].prompt_ids) + c.token_ids])
    with torch.no_grad():
        hidden = bf.model(input_ids=ids).last_hidden_state[0].float()  # [T, H] (full forward, no cache)
    P = len(reqs[0].prompt_ids)
    logits32 = hidden[P - 1 : P - 1 + len(c.token_ids)] @ bf.lm_head.weight.float().t()  # [n, V]
    assert logits32.argmax(-1).tolist() == c.token_ids  # greedy on the fp32 logits
    ent, lp = entropy_and_logprob(logits32, torch.tensor(c.token_ids))
    torch.testing.assert_close(torch.tensor(c.entropies), ent, atol=0.05, rtol=0)  # bf16 cache vs full forward
    torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=0.05, rtol=0)


def _n_sample_requests(tok, n=4, questions=("1+2?", "what is 33 + 4?", "x" * 30)):
    """n samples of each problem, as the sample stage forms them: one request per sample."""
    return [
        Request((f"p{i}", s), tuple(tok(PREFIX + q)["input_ids"])) for i, q in enumerate(questions) for s in range(n)
    ]


def _count_prompt_positions(model):
    """Wrap the decoder body: a list of the (rows, positions) of every multi-token forward (prefills)."""
    calls = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            calls.append(tuple(ids.shape))

    return calls, model.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("batch_size", [2, 4, 12, 5])
def test_shared_prompts_give_the_same_samples(peaky_model, tiny_tokenizer, batch_size):
    """n=4 samples of 3 problems, with and without encoding each problem's prompt once per
    admission: the same tokens, log-probs and entropies (to float rounding: the encoding batch
    has fewer rows), also when a batch splits a problem's samples (sizes 2, 5) and when rows
    end at different steps (continuous batching admits a few rows at a time)."""
    reqs = _n_sample_requests(tiny_tokenizer)
    cfg = SamplingConfig(n=4, temperature=1.0, max_new_tokens=16, batch_size=batch_size, seed=7)
    probe = HFSampler(peaky_model, tiny_tokenizer, share_prompts=False).generate(reqs, cfg)
    eos = {probe[0].token_ids[4], probe[5].token_ids[9]}  # rows now end at different steps
    out, rows = {}, {}
    for share in (False, True):
        s = HFSampler(peaky_model, tiny_tokenizer, share_prompts=share)
        s.eos = eos
        calls, handle = _count_prompt_positions(peaky_model)
        try:
            out[share] = s.generate(reqs, cfg)
        finally:
            handle.remove()
        rows[share] = sum(r for r, _ in calls)
    assert rows[True] < rows[False]  # some admissions held several samples of one problem
    assert len({len(c.token_ids) for c in out[False]}) >= 3
    assert len({tuple(c.token_ids) for c in out[False]}) == len(reqs)  # each sample draws its own tokens
    for a, b in zip(out[False], out[True]):
        assert a.key == b.key and a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(b.entropies), torch.tensor(a.entropies), atol=1e-5, rtol=1e-5)


def test_shared_prompts_encode_each_prompt_once_per_admission(peaky_model, tiny_tokenizer):
    """The prompt positions actually fed to the model: 3 problems x 4 samples admitted together
    encode 3 prompt rows, not 12 (the prefix shared by all prompts is encoded once either way)."""
    reqs = _n_sample_requests(tiny_tokenizer)
    cfg = SamplingConfig(n=4, temperature=1.0, max_new_tokens=4, batch_size=12, seed=7)
    shapes = {}
    for share in (False, True):
        calls, handle = _count_prompt_positions(peaky_model)
        try:
            HFSampler(peaky_model, tiny_tokenizer, share_prompts=share).generate(reqs, cfg)
        finally:
            handle.remove()
        shapes[share] = calls
    (prefix_old, (rows_old, width)), (prefix_new, (rows_new, width_new)) = shapes[False], shapes[True]
    assert prefix_old == prefix_new and prefix_old[0] == 1 and prefix_old[1] >= 8  # the global prefix
    assert (rows_old, rows_new) == (12, 3) and width == width_new  # the same padding, 4x fewer rows
