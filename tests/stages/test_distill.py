"""stages.distill: the KL(teacher || student) loss and the per-rank student runs."""

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_model, random_train_examples

from reasonmaxxer.core.chunked import chunked_head_loss
from reasonmaxxer.stages.batch_loss import shared_prefix_len
from reasonmaxxer.stages.distill import DistillConfig, distill_loss, distill_rank
from reasonmaxxer.stages.train import batch_tensors


def test_kl_term_matches_hand_value_on_a_3_token_vocab():
    # heads = identity (H = V = 3), so the hidden rows are the logits; two positions, weight 1/2 each
    p = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])  # teacher
    q = torch.tensor([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]])  # student
    hs = q.log().requires_grad_(True)
    eye = torch.eye(3)
    w = torch.full((2,), 0.5)
    loss, st = chunked_head_loss(
        hs, p.log(), eye, torch.tensor([0, 1]), torch.zeros(2), w, weight_base=2 * eye / 2, chunk=1
    )
    # KL row 0 = 0.5 ln 2 + 0.25 ln(1/2) = 0.25 ln 2; row 1 = 0
    assert float(loss) == pytest.approx(0.5 * 0.25 * math.log(2), abs=1e-6)
    assert st["anchor_kl_sum"] == pytest.approx(0.25 * math.log(2), abs=1e-6)
    loss.backward()  # d/dz_q of sum w KL = w (q - p)
    assert torch.allclose(hs.grad, 0.5 * (q - p), atol=1e-6)


def _rank2_teacher(base, scale=1.5, seed=1):
    """A copy of `base` with a rank-2 LoRA on o_proj whose two singular values are equal."""
    from peft import LoraConfig, get_peft_model

    teacher = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"]))
    g = torch.Generator().manual_seed(seed)
    for mod in teacher.modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # [2, in], [out, 2]
            qa, _ = torch.linalg.qr(torch.randn(a.shape[1], 2, generator=g))
            qb, _ = torch.linalg.qr(torch.randn(b.shape[0], 2, generator=g))
            with torch.no_grad():
                a.copy_(qa.t() * scale)
                b.copy_(qb * scale)
    return teacher.eval()


def _mean_kl(model, teacher, examples, pad=0):
    ids, att, comp, *_ = batch_tensors(examples, pad)
    n = int(comp[:, 1:].sum())
    sel = torch.zeros_like(comp)
    sel[:, 1:] = comp[:, 1:]
    with torch.no_grad():
        loss, _ = distill_loss(model, teacher, ids, att, sel, shared_prefix_len(ids, att, comp), n)
    return float(loss)


def test_distill_loss_equals_full_logits_kl(tiny_tokenizer):
    base = make_tiny_model(len(tiny_tokenizer), init_std=0.2)
    teacher = _rank2_teacher(base)
    ex = random_train_examples(4, vocab=len(tiny_tokenizer))
    ids, att, comp, *_ = batch_tensors(ex, 0)
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(base(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    m = comp[:, 1:]
    ref = float((lp.exp() * (lp - lq)).sum(-1)[m].mean())
    assert ref > 0.05  # the teacher differs from the base
    assert _mean_kl(base, teacher, ex) == pytest.approx(ref, rel=1e-4)


def test_rank2_teacher_is_recovered_at_rank_2_not_rank_1(tmp_path, tiny_tokenizer):
    base = make_tiny_model(len(tiny_tokenizer), init_std=0.2)
    teacher = _rank2_teacher(base)
    ex = random_train_examples(16, seed=3, vocab=len(tiny_tokenizer))
    kl0 = _mean_kl(base, teacher, ex)
    cfg = DistillConfig(
        target_modules=("o_proj",), lr=3e-2, warmup_steps=0, epochs=200, max_steps=150, micro_batch=16,
        grad_accum=1, checkpoint_every=1000, alpha_per_rank=1.0,
    )  # fmt: skip
    got = {}
    for r in (1, 2):
        res = distill_rank(ex, r, cfg, tmp_path / f"rank-{r}", base, teacher, tiny_tokenizer, progress=False)
        got[r] = res["final_kl"]
    assert got[2] < 0.01 * kl0, (kl0, got)  # measured: 0.0004
    assert got[1] > 0.2 * kl0, (kl0, got)  # measured: 0.34 (the best rank-1 fit leaves half the delta)


def test_a_finished_rank_is_skipped_and_a_killed_one_resumes(tmp_path, tiny_tokenizer, monkeypatch):
    import reasonmaxxer.stages.distill as dm

    base = make_tiny_model(len(tiny_tokenizer), init_std=0.2)
    teacher = _rank2_teacher(base)
    ex = random_train_examples(4, vocab=len(tiny_tokenizer))
    cfg = DistillConfig(
        target_modules=("o_proj",), epochs=2, max_steps=4, micro_batch=2, grad_accum=1, checkpoint_every=2
    )
    out = tmp_path / "rank-1"
    calls = {"n": 0}
    real = dm.distill_loss

    def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dm, "distill_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        distill_rank(ex, 1, cfg, out, base, teacher, tiny_tokenizer, progress=False)
    assert not hasattr(base, "peft_config")  # the base is handed back
    monkeypatch.setattr(dm, "distill_loss", real)
    res = distill_rank(ex, 1, cfg, out, base, teacher, tiny_tokenizer, progress=False)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and res["total_steps"] == 4
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "train_config.json").is_file()
    assert 0 < res["trainable_pct"] < 100

    monkeypatch.setattr(dm, "attach_adapter", lambda *a: pytest.fail("a finished rank was trained again"))
    assert distill_rank(ex, 1, cfg, out, base, teacher, tiny_tokenizer, progress=False) == res


def test_gated_positions_follow_the_base_entropies_and_none_is_an_error(tmp_path, tiny_tokenizer):
    from dataclasses import replace

    from reasonmaxxer.errors import ReasonMaxxerError
    from reasonmaxxer.stages.distill import position_masks

    ex = random_train_examples(6, vocab=len(tiny_tokenizer))
    masks, tau = position_masks(ex, DistillConfig(positions="gated", tau_fraction=0.2))
    for e, m in zip(ex, masks):
        assert m.tolist() == [h > tau for h in e.entropies]
    assert 0 < sum(int(m.sum()) for m in masks) < sum(len(m) for m in masks)
    flat = [replace(e, entropies=(0.0,) * len(e.entropies)) for e in ex]
    base = make_tiny_model(len(tiny_tokenizer))
    with pytest.raises(ReasonMaxxerError, match="no position to match"):
        distill_rank(flat, 1, DistillConfig(positions="gated"), tmp_path, base, base, tiny_tokenizer, progress=False)
