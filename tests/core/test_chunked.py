"""Tests for reasonmaxxer.core.chunked: values and gradients against today's unchunked loss
(`reasonmaxxer_loss` on [B, T, V] logits), against fp64 autograd, by hand, and its memory bound."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from reasonmaxxer.core.chunked import chunked_head_loss, head_loss_weights
from reasonmaxxer.core.entropy import token_logprobs
from reasonmaxxer.core.losses import reasonmaxxer_loss


def _problem(B, T, H, V, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * scale).requires_grad_()
    hidden_base = hidden.detach() + 0.3 * torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    gate = torch.rand(B, T, generator=g) < 0.3
    anchor = ~gate & (torch.rand(B, T, generator=g) < 0.8)  # some positions in neither
    return hidden, hidden_base, weight, targets, adv, gate, anchor


def _unchunked(hidden, hidden_base, weight, targets, adv, gate, anchor, lam, dec_denom, anc_denom):
    """The full-logits path: logits, then reasonmaxxer_loss (as stages/batch_loss.py does without chunking)."""
    logits = hidden @ weight.t()  # [B, T, V]
    with torch.no_grad():
        base = hidden_base @ weight.t()
    return reasonmaxxer_loss(
        token_logprob=token_logprobs(logits, targets),
        logits_theta=logits,
        logits_base=base,
        advantages=adv,
        gate=gate,
        anchor_mask=anchor,
        lam=lam,
        dec_denom=dec_denom,
        anc_denom=anc_denom,
    )


def _chunked(hidden, hidden_base, weight, targets, adv, gate, anchor, lam, dec_denom, anc_denom, chunk):
    H = hidden.shape[-1]
    pos, dec, anc = head_loss_weights(adv, gate, anchor, lam, dec_denom, anc_denom)
    return chunked_head_loss(
        hidden.reshape(-1, H)[pos],
        hidden_base.reshape(-1, H)[pos],
        weight,
        targets.reshape(-1)[pos],
        dec,
        anc,
        chunk=chunk,
    )


def _grads(loss, *xs):
    for x in xs:
        x.grad = None
    loss.backward()
    return [x.grad.clone() for x in xs]


@pytest.mark.parametrize(
    "B,T,H,V,chunks",
    [(3, 5, 8, 11, (1, 7, 15, 64)), (2, 12, 32, 151_936, (5, 1024))],
    ids=["tiny-vocab", "qwen-vocab"],
)
def test_matches_unchunked_value_grads_and_stats(B, T, H, V, chunks):
    hidden, hidden_base, weight, targets, adv, gate, anchor = _problem(B, T, H, V)
    lam, dec_denom, anc_denom = 0.2, float(gate.sum()) + 3, float(anchor.sum()) + 5  # step-wide counts
    ref_loss, ref_stats = _unchunked(hidden, hidden_base, weight, targets, adv, gate, anchor, lam, dec_denom, anc_denom)
    ref_gh, ref_gw = _grads(ref_loss, hidden, weight)
    N = int((gate | anchor).sum())
    # fp32 sums over V terms in a different order: the error grows with V (measured up to 2e-6 at
    # V = 152k on some CPUs); a wrong gradient is off by orders of magnitude more.
    tol = {"rtol": 1e-5, "atol": 1e-6} if V < 1000 else {"rtol": 1e-4, "atol": 2e-5}
    for chunk in chunks:
        loss, st = _chunked(hidden, hidden_base, weight, targets, adv, gate, anchor, lam, dec_denom, anc_denom, chunk)
        gh, gw = _grads(loss, hidden, weight)
        assert loss.dtype == torch.float32 and loss.shape == ()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gh, ref_gh, **tol)
        torch.testing.assert_close(gw, ref_gw, **tol)
        assert st["decision"] == pytest.approx(ref_stats["decision"], rel=1e-5, abs=1e-7)
        assert st["anchor_kl_sum"] / anc_denom == pytest.approx(ref_stats["anchor"], rel=1e-5, abs=1e-7)
        assert st["anchor_loss"] == pytest.approx(lam * ref_stats["anchor"], rel=1e-5, abs=1e-7)
        assert st["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5, abs=1e-7)
    assert N < B * T  # the positions in neither mask were left out


def test_lam_zero_needs_no_base():
    hidden, _, weight, targets, adv, gate, anchor = _problem(2, 6, 8, 13, seed=1)
    ref_loss, ref_stats = _unchunked(hidden, hidden, weight, targets, adv, gate, anchor, 0.0, 4.0, 9.0)
    ref_gh, ref_gw = _grads(ref_loss, hidden, weight)
    pos, dec, anc = head_loss_weights(adv, gate, anchor, 0.0, 4.0, 9.0)
    assert not anc.any()
    h = hidden.reshape(-1, 8)[pos]
    loss, st = chunked_head_loss(h, None, weight, targets.reshape(-1)[pos], dec, anc, chunk=3)
    gh, gw = _grads(loss, hidden, weight)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert st["anchor_loss"] == st["anchor_kl_sum"] == ref_stats["anchor"] == 0.0
    with pytest.raises(ValueError, match="hidden_base is None"):
        chunked_head_loss(h, None, weight, targets.reshape(-1)[pos], dec, anc + 0.1)


def test_hand_values_three_token_vocab():
    # weight = I (V = H = 3), so logits = hidden and grad_hidden = G.
    # row 0: logits (0, 0, 0), q = 1/3 each, target 0, dec = -2: term -2 log(1/3) = 2 ln 3.
    #   G0 = -2 * (onehot(0) - q) = (-4/3, 2/3, 2/3)
    # row 1: theta (ln 2, 0, 0): q = (1/2, 1/4, 1/4); base (0, 0, 0): p = 1/3 each; anc = 0.5.
    #   KL(p||q) = sum p (log p - log q) = -ln 3 + (1/3) ln 2 + (2/3) 2 ln 2 = (5/3) ln 2 - ln 3
    #   G1 = 0.5 * (q - p) = (1/12, -1/24, -1/24); grad_W = G^T h = column 0: G1 * ln 2.
    # row 1 entropy (ent = 1 in the second call): H(q) = 1.5 ln 2,
    #   dH/dz = -q (log q + H) = (-ln2/4, ln2/8, ln2/8)
    ln2, ln3 = math.log(2), math.log(3)
    hidden = torch.tensor([[0.0, 0, 0], [ln2, 0, 0]], requires_grad=True)
    base = torch.zeros(2, 3)
    weight = torch.eye(3, requires_grad=True)
    targets = torch.tensor([0, 2])
    dec, anc = torch.tensor([-2.0, 0.0]), torch.tensor([0.0, 0.5])
    loss, st = chunked_head_loss(hidden, base, weight, targets, dec, anc, chunk=1)
    kl = 5 / 3 * ln2 - ln3
    assert float(loss.detach()) == pytest.approx(2 * ln3 + 0.5 * kl, rel=1e-6)
    assert st["decision"] == pytest.approx(2 * ln3, rel=1e-6)
    assert st["anchor_kl_sum"] == pytest.approx(kl, rel=1e-5)
    assert st["anchor_loss"] == pytest.approx(0.5 * kl, rel=1e-5)
    gh, gw = _grads(loss, hidden, weight)
    torch.testing.assert_close(gh, torch.tensor([[-4 / 3, 2 / 3, 2 / 3], [1 / 12, -1 / 24, -1 / 24]]))
    expected_gw = torch.zeros(3, 3)
    expected_gw[:, 0] = torch.tensor([1 / 12, -1 / 24, -1 / 24]) * ln2
    torch.testing.assert_close(gw, expected_gw)

    ent = torch.tensor([0.0, 1.0])
    loss, st = chunked_head_loss(hidden, base, weight, targets, dec, anc, ent_weight=ent, chunk=2)
    assert st["entropy_sum"] == pytest.approx(1.5 * ln2, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(2 * ln3 + 0.5 * kl + 1.5 * ln2, rel=1e-6)
    gh, _ = _grads(loss, hidden, weight)
    dh = torch.tensor([-ln2 / 4, ln2 / 8, ln2 / 8])
    torch.testing.assert_close(gh[1], torch.tensor([1 / 12, -1 / 24, -1 / 24]) + dh)


def _fp64_reference(h, hb, w, b, wb, bb, y, dec, anc, ent):
    """Plain autograd in float64 on the same (upcast) values; returns the loss."""
    lq = torch.log_softmax(h.double() @ w.double().t() + (0 if b is None else b.double()), -1)
    lp = torch.log_softmax(hb.double() @ wb.double().t() + (0 if bb is None else bb.double()), -1)
    loss = (dec.double() * lq.gather(1, y[:, None]).squeeze(1)).sum()
    loss = loss + (anc.double() * (lp.exp() * (lp - lq)).sum(-1)).sum()
    if ent is not None:
        loss = loss + (ent.double() * -(lq.exp() * lq).sum(-1)).sum()
    return loss


def _random_rows(N, H, V, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * scale).to(dtype).requires_grad_()
    hb = (h.detach().float() + 0.5 * torch.randn(N, H, generator=g)).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    dec = torch.where(torch.rand(N, generator=g) < 0.4, torch.randn(N, generator=g), torch.zeros(N))
    anc = torch.where(dec == 0, torch.rand(N, generator=g), torch.zeros(N))
    ent = torch.randn(N, generator=g) * 0.1
    return h, hb, w, b, y, dec, anc, ent


def test_bias_entropy_separate_base_head_and_outer_gradient_match_fp64():
    h, hb, w, b, y, dec, anc, ent = _random_rows(17, 6, 29, seed=2)
    g = torch.Generator().manual_seed(9)
    wb, bb = torch.randn(29, 6, generator=g), torch.randn(29, generator=g)  # a full fine-tune's frozen head
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = _fp64_reference(h64, hb, w64, b64, wb, bb, y, dec, anc, ent)
    (3.0 * ref).backward()
    loss, _ = chunked_head_loss(h, hb, w, y, dec, anc, bias=b, weight_base=wb, bias_base=bb, ent_weight=ent, chunk=4)
    (3.0 * loss).backward()  # the outer gradient (3) must scale every input gradient
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for x, x64 in ((h, h64), (w, w64), (b, b64)):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_tied_embedding_gets_both_gradients():
    # the head is the input embedding: its gradient is the head's plus the lookup's
    g = torch.Generator().manual_seed(10)
    emb = torch.randn(23, 6, generator=g).requires_grad_()
    mix = torch.randn(6, 6, generator=g)
    ids, y = torch.randint(0, 23, (1, 9), generator=g), torch.randint(0, 23, (1, 9), generator=g)
    adv, gate = torch.tensor([0.8]), torch.rand(1, 9, generator=g) < 0.4
    hidden_base = torch.randn(1, 9, 6, generator=g)
    hidden = torch.tanh(emb[ids] @ mix)  # [1, 9, 6]
    args = (hidden_base, emb, y, adv, gate, ~gate, 0.2, 5.0, 7.0)
    (ref_g,) = _grads(_unchunked(hidden, *args)[0], emb)
    hidden = torch.tanh(emb[ids] @ mix)
    (g_emb,) = _grads(_chunked(hidden, *args, chunk=4)[0], emb)
    torch.testing.assert_close(g_emb, ref_g, rtol=1e-5, atol=1e-6)
    hidden = torch.tanh(emb[ids] @ mix)
    (lookup_only,) = _grads(_chunked(hidden, hidden_base, emb.detach(), *args[2:], chunk=4)[0], emb)
    assert not torch.allclose(lookup_only, ref_g)  # the head's own gradient is really there


def test_large_logits_are_stable():
    # logits of order 1e4: exp overflows without the max shift, and log q of the rest is ~-1e4
    h, hb, w, b, y, dec, anc, ent = _random_rows(9, 4, 50, seed=3, scale=2_000.0)
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    ref = _fp64_reference(h64, hb, w64, None, w64.detach(), None, y, dec, anc, ent)
    ref.backward()
    loss, st = chunked_head_loss(h, hb, w, y, dec, anc, ent_weight=ent, chunk=4)
    loss.backward()
    assert (h.detach() @ w.detach().t()).abs().max() > 1e3
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in st.values())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)


def test_masked_vocabulary_minus_inf_bias_equals_the_smaller_vocabulary():
    # a -inf bias entry is a token of probability 0 in both models: the loss and the
    # gradients equal those on the vocabulary without it (0 * log 0 counts as 0, not nan)
    h, hb, w, b, y, dec, anc, ent = _random_rows(11, 5, 20, seed=6)
    keep = torch.ones(20, dtype=torch.bool)
    keep[[3, 7, 19]] = False
    y = torch.where(keep[y], y, torch.zeros_like(y))  # targets are never a masked token
    bias = b.detach().masked_fill(~keep, -torch.inf)
    loss, st = chunked_head_loss(h, hb, w, y, dec, anc, bias=bias, ent_weight=ent, chunk=4)
    loss.backward()
    w_small = w.detach()[keep].requires_grad_()
    h2 = h.detach().clone().requires_grad_()
    y_small = torch.cumsum(keep.long(), 0)[y] - 1  # index of each target among the kept tokens
    loss2, st2 = chunked_head_loss(h2, hb, w_small, y_small, dec, anc, bias=b.detach()[keep], ent_weight=ent, chunk=4)
    loss2.backward()
    assert all(math.isfinite(v) for v in st.values())
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad[keep], w_small.grad, rtol=1e-6, atol=1e-6)
    assert (w.grad[~keep] == 0).all()


def test_bf16_inputs_computed_in_fp32():
    h, hb, w, b, y, dec, anc, ent = _random_rows(33, 16, 1000, seed=4, dtype=torch.bfloat16)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = _fp64_reference(h64, hb, w64, b64, w64.detach(), b64.detach(), y, dec, anc, ent)
    ref.backward()
    loss, _ = chunked_head_loss(h, hb, w, y, dec, anc, bias=b, ent_weight=ent, chunk=8)
    loss.backward()
    assert loss.dtype == torch.float32
    assert (h.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.bfloat16,) * 3
    # the value is fp32-accurate (bf16 logits would be off by ~1e-2 relative)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for x, x64 in ((h, h64), (w, w64), (b, b64)):  # bf16 grads: rounding of the output only
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_largest_tensor_is_one_chunk_of_logits():
    N, H, V, chunk = 4096, 8, 151_936, 8  # [N, V] fp32 would be 2.5 GB
    h, hb, w, b, y, dec, anc, ent = _random_rows(N, H, V, seed=5)
    with _LargestTensor() as mode:
        loss, _ = chunked_head_loss(h, hb, w, y, dec, anc, bias=b, ent_weight=ent, chunk=chunk)
        loss.backward()
    assert w.grad is not None and h.grad is not None
    assert mode.largest <= max(chunk * V, V * H, N * H) < N * V // 100
    # the recorder sees the naive computation's [n, V] logits (so the bound above can fail)
    n = 64
    with _LargestTensor() as naive:
        _fp64_reference(h[:n].float(), hb[:n], w, None, w.detach(), None, y[:n], dec[:n], anc[:n], None).backward()
    assert naive.largest >= n * V


def test_head_loss_weights_and_errors():
    adv = torch.tensor([1.0, -2.0])
    gate = torch.tensor([[False, True, False], [False, False, True]])
    anchor = torch.tensor([[False, False, True], [True, True, False]])
    pos, dec, anc = head_loss_weights(adv, gate, anchor, 0.2, 4.0, 2.0)
    assert pos.tolist() == [1, 2, 3, 4, 5]
    torch.testing.assert_close(dec, torch.tensor([-0.25, 0, 0, 0, 0.5]))
    torch.testing.assert_close(anc, torch.tensor([0, 0.1, 0.1, 0.1, 0]))
    with pytest.raises(ValueError, match="must be > 0"):
        head_loss_weights(adv, gate, anchor, 0.2, 0.0, 2.0)
    h, w = torch.zeros(2, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="targets must be"):
        chunked_head_loss(h, None, w, torch.zeros(3, dtype=torch.long), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="chunk must be"):
        chunked_head_loss(h, None, w, torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2), chunk=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_matches_unchunked_at_qwen_vocab():
    cpu = _problem(2, 12, 32, 151_936, seed=7)
    hidden, hidden_base, weight, targets, adv, gate, anchor = (x.detach().cuda() for x in cpu)
    hidden.requires_grad_(), weight.requires_grad_()
    args = (hidden, hidden_base, weight, targets, adv, gate, anchor, 0.2, float(gate.sum()) + 1, float(anchor.sum()))
    ref_loss, ref_stats = _unchunked(*args)
    ref_gh, ref_gw = _grads(ref_loss, hidden, weight)
    loss, st = _chunked(*args, chunk=7)
    gh, gw = _grads(loss, hidden, weight)
    assert loss.device.type == gh.device.type == gw.device.type == "cuda"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert st["decision"] == pytest.approx(ref_stats["decision"], rel=1e-5, abs=1e-7)


@cuda
def test_cuda_bf16_matches_fp64_and_peak_memory_is_bounded():
    N, H, V, chunk = 8192, 64, 151_936, 256  # [N, V] fp32 = 5 GB; a chunk's = 0.16 GB
    h, hb, w, b, y, dec, anc, ent = (x.detach().cuda() for x in _random_rows(N, H, V, seed=8, dtype=torch.bfloat16))
    h.requires_grad_(), w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss, _ = chunked_head_loss(h, hb, w, y, dec, anc, bias=b, ent_weight=ent, chunk=chunk)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    # at most ~6 [chunk, V] fp32 buffers + fp32 copies/grads of the head and of hidden
    bound = 6 * chunk * V * 4 + 3 * V * H * 4 + 2 * N * H * 4
    assert peak < bound < N * V * 4 / 4, (peak, bound)
    n = 512  # the fp64 reference on the first rows only (it materialises [n, V])
    h64, w64 = h.detach()[:n].double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _fp64_reference(h64, hb[:n], w64, b, w64.detach(), b, y[:n], dec[:n], anc[:n], ent[:n])
    ref.backward()
    h2, w2 = h.detach()[:n].clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss2, _ = chunked_head_loss(h2, hb[:n], w2, y[:n], dec[:n], anc[:n], bias=b, ent_weight=ent[:n], chunk=chunk)
    loss2.backward()
    assert h2.grad.dtype == w2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss2.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad.double(), h64.grad, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(w2.grad.double(), w64.grad, rtol=1e-2, atol=1e-4)


def test_no_positions_gives_zero_loss_and_zero_gradients():
    h, w = torch.zeros(0, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss, st = chunked_head_loss(
        h, torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and set(st.values()) == {0.0}
    assert h.grad.shape == (0, 4) and (w.grad == 0).all()


def test_an_enclosing_bf16_autocast_does_not_reach_the_fp32_math():
    """A full fine-tune of a bf16 model runs its forward under bf16 autocast; the chunked loss
    keeps its own matmuls fp32 (value and gradients as without autocast)."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 6, 8, 50
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    hb = torch.randn(N, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    dec, anc = torch.randn(N, generator=g), torch.rand(N, generator=g)
    outs = []
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = chunked_head_loss(h, hb, w, t, dec, anc, chunk=4)
        gh, gw = torch.autograd.grad(loss, (h, w))
        outs.append((loss, gh, gw))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_per_row_denominators_and_diagnostics_match_unchunked(chunk):
    """Per-sequence normalisation ([B] per-row denominators) and the Delta-logp / pressure
    diagnostics: the chunked loss equals the logits path in value, gradient and stats."""
    B, T, H, V = 3, 6, 8, 11
    hidden, hidden_base, weight, targets, adv, gate, anchor = _problem(B, T, H, V, seed=3)
    gate[2] = False  # a row with no gated token
    adv = torch.tensor([1.2, -0.7, 0.5])
    S = 4  # the step's sequences (one more, in another micro-batch)
    dec_d = S * gate.sum(1).clamp(min=1).double()
    anc_d = S * anchor.sum(1).clamp(min=1).double()
    logits = hidden @ weight.t()
    with torch.no_grad():
        base = hidden_base @ weight.t()
    ref_loss, ref = reasonmaxxer_loss(
        token_logprob=token_logprobs(logits, targets),
        logits_theta=logits,
        logits_base=base,
        advantages=adv,
        gate=gate,
        anchor_mask=anchor,
        lam=0.2,
        dec_denom=dec_d,
        anc_denom=anc_d,
        base_token_logprob=token_logprobs(base, targets),
    )
    # by hand: the mean over rows of (row decision mean + lam * row KL mean), / S
    lp = token_logprobs(logits, targets).detach()
    kl = (base.softmax(-1) * (base.log_softmax(-1) - logits.detach().log_softmax(-1))).sum(-1)
    by_row = [
        -(adv[b] * lp[b][gate[b]]).sum() / max(1, int(gate[b].sum())) + 0.2 * kl[b][anchor[b]].mean() for b in range(B)
    ]
    assert ref_loss.item() == pytest.approx(float(sum(by_row)) / S, rel=1e-5)
    ref_gh, ref_gw = _grads(ref_loss, hidden, weight)
    pos, dec, anc = head_loss_weights(adv, gate, anchor, 0.2, dec_d, anc_d)
    adv_rows = torch.where(gate.reshape(-1)[pos], adv[:, None].expand(B, T).reshape(-1)[pos], 0.0)
    loss, st = chunked_head_loss(
        hidden.reshape(-1, H)[pos],
        hidden_base.reshape(-1, H)[pos],
        weight,
        targets.reshape(-1)[pos],
        dec,
        anc,
        adv_rows=adv_rows,
        chunk=chunk,
    )
    gh, gw = _grads(loss, hidden, weight)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert st["anchor_loss"] / 0.2 == pytest.approx(ref["anchor"], rel=1e-5)
    for k in ("dlogp_pos_sum", "dlogp_neg_sum", "pos_pressure", "neg_pressure"):
        assert st[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    for k in ("dlogp_pos_tokens", "dlogp_neg_tokens"):
        assert st[k] == ref[k] > 0, k
    assert ref["dlogp_pos_tokens"] + ref["dlogp_neg_tokens"] == int(gate.sum())
    with pytest.raises(ValueError, match="both"):
        head_loss_weights(adv, gate, anchor, 0.2, dec_d, 5.0)


def test_diagnostics_base_logprobs_in_chunks_without_anchor():
    """A chunk of decision rows only (no anchored row) still gets its log p_base(y)."""
    B, T, H, V = 1, 4, 8, 11
    hidden, hidden_base, weight, targets, adv, _, _ = _problem(B, T, H, V, seed=4)
    gate = torch.ones(B, T, dtype=torch.bool)
    anchor = torch.zeros(B, T, dtype=torch.bool)
    pos, dec, anc = head_loss_weights(adv, gate, anchor, 0.2, 4.0, 1.0)
    _, st = chunked_head_loss(
        hidden.reshape(-1, H),
        hidden_base.reshape(-1, H),
        weight,
        targets.reshape(-1),
        dec,
        anc,
        adv_rows=adv.expand(T).clone(),
        chunk=2,
    )
    d = token_logprobs(hidden.detach() @ weight.detach().t(), targets) - token_logprobs(
        hidden_base @ weight.detach().t(), targets
    )
    key = "dlogp_pos" if adv.item() > 0 else "dlogp_neg"
    assert st[f"{key}_tokens"] == T and st[f"{key}_sum"] == pytest.approx(float(d.sum()), rel=1e-5)
