"""Tests for reasonmaxxer.scoring: entropy/log-prob helpers and chunked sequence scoring."""

import math

import pytest
import torch
from conftest import make_tiny_model

from reasonmaxxer.core.entropy import token_entropy, token_logprobs
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.score import position_ids_from_mask, score_sequences

# ---------------------------------------------------------------- token_entropy: hand values


def test_entropy_uniform_is_log_v():
    # softmax of equal logits is uniform over V=7: H = -sum 1/7 log 1/7 = log 7 = 1.945910
    logits = torch.full((2, 3, 7), 3.25)
    torch.testing.assert_close(token_entropy(logits), torch.full((2, 3), math.log(7)), atol=1e-6, rtol=0)


def test_entropy_one_hot_is_zero():
    # [0, -inf, -inf]: p = (1, 0, 0) exactly, H = -(1 log 1) - 0 - 0 = 0 (no nan from 0 * -inf)
    # [50, 0, 0]: p ~ (1, e^-50, e^-50), H ~ 50 * 2e^-50 ~ 0
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [50.0, 0.0, 0.0]])
    torch.testing.assert_close(token_entropy(logits), torch.zeros(2), atol=1e-6, rtol=0)


def test_entropy_three_way_hand_distribution():
    # p = (1/2, 1/4, 1/4), logits = log p.
    # H = 1/2 ln 2 + 2 * 1/4 ln 4 = 0.5*0.693147 + 0.5*1.386294 = 1.5 ln 2 = 1.039721 nats
    logits = torch.tensor([0.5, 0.25, 0.25]).log() + 10.0  # a shift changes nothing
    assert token_entropy(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_entropy_dtypes_chunks_and_input_untouched():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4  # [B, T, V]
    ref = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)  # [3, 5]
    before = logits.clone()
    for chunk in (1, 4, 128):
        torch.testing.assert_close(token_entropy(logits, chunk_size=chunk), ref, atol=1e-5, rtol=0)
    assert torch.equal(logits, before)
    bf = token_entropy(logits.bfloat16())
    assert bf.dtype == torch.float32 and bf.shape == (3, 5)
    torch.testing.assert_close(bf, ref, atol=5e-2, rtol=0)
    # non-contiguous input (the usual logits[:, :-1] shift)
    torch.testing.assert_close(token_entropy(logits[:, :-1], chunk_size=3), ref[:, :-1], atol=1e-5, rtol=0)


def test_entropy_matches_float64_on_a_real_sized_vocabulary():
    # V = 49152 (SmolLM2), peaked logits of LLM-like magnitude: fp32 error must stay ~1e-6,
    # which catches an fp32 reduction that accumulates the 49k terms naively (~1e-3 off).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=g) * 4
    logits[:, :3] += torch.tensor([12.0, 11.0, 10.0])  # a few dominant tokens
    logp = logits.double().log_softmax(-1)
    ref = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(token_entropy(logits, chunk_size=4).double(), ref, atol=1e-5, rtol=0)
    tok = torch.tensor([0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(
        token_logprobs(logits, tok).double(), logp.gather(-1, tok[:, None]).squeeze(-1), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------- token_logprobs


def test_logprobs_hand_value_and_grad():
    # p = (1/2, 1/4, 1/4): log p(token 1) = ln(1/4) = -1.386294
    logits = (torch.tensor([[0.5, 0.25, 0.25]]).log() + 2.0).requires_grad_()
    lp = token_logprobs(logits, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.25), abs=1e-6)
    # d log p_1 / d logits = onehot(1) - p = (-1/2, 3/4, -1/4)
    lp.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.5, 0.75, -0.25]]), atol=1e-6, rtol=0)


def test_logprobs_match_autograd_reference():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 9, requires_grad=True)
    tok = torch.randint(0, 9, (2, 4))
    w = torch.randn(2, 4)
    ours = token_logprobs(x, tok, chunk_size=3)
    (ours * w).sum().backward()
    g_ours = x.grad.clone()
    x.grad = None
    ref = x.log_softmax(-1).gather(-1, tok[..., None]).squeeze(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, x.grad, atol=1e-6, rtol=0)
    # non-contiguous input, gradient routed back through the slice
    y = torch.randn(2, 5, 9, requires_grad=True)
    token_logprobs(y[:, :-1], tok, chunk_size=2).sum().backward()
    ref_g = torch.autograd.grad(y[:, :-1].log_softmax(-1).gather(-1, tok[..., None]).sum(), y)[0]
    torch.testing.assert_close(y.grad, ref_g, atol=1e-6, rtol=0)


def test_logprobs_shape_mismatch_raises():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- score_sequences


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)  # left padded (conftest)
    return enc["input_ids"], enc["attention_mask"]


def _naive(model, ids, mask):
    """Full fp32 logits via model(...).logits, shifted so column t predicts token t."""
    pos = position_ids_from_mask(mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()  # [B, T, V]
    logp = logits.log_softmax(-1)[:, :-1]  # [B, T-1, V], row t-1 predicts token t
    ent = -(logp.exp() * logp).sum(-1)  # [B, T-1]
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    z = torch.zeros(ids.shape[0], 1)
    return (
        torch.cat([z, torch.where(valid, ent, 0.0)], 1),
        torch.cat([z, torch.where(valid, lp, 0.0)], 1),
    )


TEXTS = ["The answer is 42.", "x", "Let x = 3; then 2x + 1 = 7, so the result is \\boxed{7}."]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_score_sequences_equals_naive_left_padded(tiny_tokenizer, arch):
    model = make_tiny_model(len(tiny_tokenizer), seed=3, arch=arch)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    assert (mask[:, 0] == 0).any()  # really left padded
    ref_ent, ref_lp = _naive(model, ids, mask)
    for chunk in (7, 256):  # chunks straddling rows, and one chunk for everything
        ent, lp = score_sequences(model, ids, mask, chunk_tokens=chunk)
        assert ent.dtype == lp.dtype == torch.float32 and ent.shape == ids.shape
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    # column 0, padding, and the first real token of each row are exactly 0
    first_real = mask.argmax(1)
    assert (ent[:, 0] == 0).all() and (ent[mask == 0] == 0).all() and (lp[mask == 0] == 0).all()
    assert (ent[torch.arange(3), first_real] == 0).all()
    assert (ent[:, 1:][(mask[:, 1:] * mask[:, :-1]).bool()] > 0).all()


def test_left_padded_row_scores_like_unpadded(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), seed=4)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    ent, lp = score_sequences(model, ids, mask)
    solo = tiny_tokenizer([TEXTS[0]], return_tensors="pt")
    ent1, lp1 = score_sequences(model, solo["input_ids"], solo["attention_mask"])
    n = solo["input_ids"].shape[1]
    torch.testing.assert_close(ent[0, -n:], ent1[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[0, -n:], lp1[0], atol=1e-5, rtol=0)


def test_right_padding_and_bf16(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), seed=5)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    # convert to right padding by rolling each row
    shifts = (mask == 0).sum(1)
    ids_r = torch.stack([r.roll(-int(s)) for r, s in zip(ids, shifts)])
    mask_r = torch.stack([r.roll(-int(s)) for r, s in zip(mask, shifts)])
    ent_l, lp_l = score_sequences(model, ids, mask)
    ent_r, lp_r = score_sequences(model, ids_r, mask_r)
    for b, s in enumerate(shifts.tolist()):
        T = ids.shape[1]
        torch.testing.assert_close(ent_r[b, : T - s], ent_l[b, s:], atol=1e-5, rtol=0)
        torch.testing.assert_close(lp_r[b, : T - s], lp_l[b, s:], atol=1e-5, rtol=0)


def test_bf16_model_scores_from_fp32_logits(tiny_tokenizer):
    """A bf16 model's head runs in fp32 on its (bf16) hidden states: the scores equal the
    fp32 head's, not those of the bf16-rounded logits that model(...).logits returns."""
    bf = make_tiny_model(len(tiny_tokenizer), seed=5).to(torch.bfloat16)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    ent_b, lp_b = score_sequences(bf, ids, mask, chunk_tokens=5)
    pos = position_ids_from_mask(mask)
    hidden = bf.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state  # [B, T, H] bf16
    logits32 = hidden.float() @ bf.lm_head.weight.float().t()  # [B, T, V] fp32 head
    logp = logits32.log_softmax(-1)[:, :-1]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    ref_ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    ref_lp = torch.where(valid, logp.gather(-1, ids[:, 1:, None]).squeeze(-1), 0.0)
    torch.testing.assert_close(ent_b[:, 1:], ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp_b[:, 1:], ref_lp, atol=1e-5, rtol=0)
    rounded, _ = _naive(bf, ids, mask)  # from bf16 logits: what the scorer computed before
    assert (ent_b - rounded).abs().max() > 1e-4


def test_peft_wrapped_model(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model(len(tiny_tokenizer), seed=6)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter non-trivial
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    ref_ent, ref_lp = _naive(peft_model, ids, mask)
    ent, lp = score_sequences(peft_model, ids, mask, chunk_tokens=16)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    with peft_model.disable_adapter():  # the base distribution, as the anchor needs
        e0, _ = score_sequences(peft_model, ids, mask)
    fresh = make_tiny_model(len(tiny_tokenizer), seed=6)  # get_peft_model injected LoRA into `base`
    torch.testing.assert_close(e0, _naive(fresh, ids, mask)[0], atol=1e-5, rtol=0)


def _subclass_with_postprocess(model, fn):
    """Re-class ``model`` so that its forward applies ``fn`` to the logits (a stand-in arch)."""
    orig = type(model).forward

    class Post(type(model)):
        def forward(self, *a, **k):
            out = orig(self, *a, **k)
            out.logits = fn(out.logits)
            return out

    model.__class__ = Post
    return model


def test_undeclared_logit_postprocessing_raises(tiny_tokenizer):
    model = _subclass_with_postprocess(make_tiny_model(len(tiny_tokenizer), seed=7), lambda x: x * 3.0)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    with pytest.raises(ReasonMaxxerError, match="post-processes its logits"):
        score_sequences(model, ids, mask)


@pytest.mark.parametrize(
    "attr,value,fn",
    [
        ("logit_scale", 3.0, lambda x: x * 3.0),  # Cohere
        ("logits_scaling", 4.0, lambda x: x / 4.0),  # Granite
        ("final_logit_softcapping", 0.5, lambda x: torch.tanh(x / 0.5) * 0.5),  # Gemma 2/3
    ],
)
def test_declared_logit_postprocessing_is_reproduced(tiny_tokenizer, attr, value, fn):
    model = _subclass_with_postprocess(make_tiny_model(len(tiny_tokenizer), seed=7), fn)
    setattr(model.config, attr, value)
    ids, mask = _batch(tiny_tokenizer, TEXTS)
    ent, lp = score_sequences(model, ids, mask, chunk_tokens=10)
    ref_ent, ref_lp = _naive(model, ids, mask)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)


def test_shape_errors(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), seed=8)
    with pytest.raises(ValueError):
        score_sequences(model, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
