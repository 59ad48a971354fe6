"""RL baselines through TRL on a tiny model: each method trains, the reward is our grader,
the curve is written, runs resume, the wall-clock cap stops training."""

import itertools
import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.recipes.baselines import (
    METHODS,
    BaselineConfig,
    flops,
    load_baseline_config,
    make_reward,
    run_baseline,
    step_compute,
)
from reasonmaxxer.stages.evaluate import EvalConfig


def test_flops_by_hand():
    # N = 10: 3 forward-only tokens -> 2*10*3 = 60; 2 trained tokens -> 6*10*2 = 120
    assert flops(10, 3, 2) == 180.0


def test_step_compute_counts_reference_forward_only_with_kl():
    c = {"generated_tokens": 30, "prompt_tokens": 70}
    no_kl = step_compute(c, 10, beta=0.0)
    assert no_kl == {
        "generated_tokens": 30,
        "forward_tokens": 100,
        "trained_tokens": 100,
        "flops": 2 * 10 * 100 + 6 * 10 * 100,
    }
    with_kl = step_compute(c, 10, beta=0.05)
    assert with_kl["forward_tokens"] == 200 and with_kl["flops"] == 2 * 10 * 200 + 6 * 10 * 100


def test_reward_is_our_strict_grader_and_counts_tokens():
    counters = {}
    fn = make_reward({"P1": "4", "P2": "7"}, {"P1": 5, "P2": 6}, counters)
    r = fn(
        prompts=["P1", "P1", "P2"],
        completions=["So 2+2 = 4. The answer is \\boxed{4}.", "\\boxed{5}", "\\boxed{7}"],
        completion_ids=[[1, 2, 3], [4], [5, 6]],
    )
    assert r == [1.0, 0.0, 1.0]
    assert counters == {"generated_tokens": 6, "prompt_tokens": 16, "completions": 3, "correct": 2}


def test_reward_rejects_unknown_prompt():
    fn = make_reward({"P1": "4"}, {"P1": 5}, {})
    with pytest.raises(ReasonMaxxerError, match="not in the training set"):
        fn(prompts=["other"], completions=["\\boxed{4}"])


@pytest.fixture()
def tiny_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "tiny"
    m = make_tiny_model(len(tiny_tokenizer), init_std=0.2)
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _cfg(tmp_path, tiny_dir, method, **kw):
    base = dict(
        method=method,
        out=str(tmp_path / f"bl-{method}"),
        model=str(tiny_dir),
        template="raw",
        train_problems="arith:train:4",
        test_problems="arith:test:2",
        max_new_tokens=6,
        max_steps=2,
        eval_every=0,
        prompts_per_step=2,
        num_generations=2,
        lr=5e-2,
        lora_rank=4,
        lora_alpha=8,
        eval=EvalConfig(n=0, greedy=True, max_new_tokens=6, batch_size=4),
    )
    base.update(kw)
    return BaselineConfig(**base)


def _alternating():
    cyc = itertools.cycle([True, False])
    return lambda golds, texts: [next(cyc) for _ in golds]


def _load(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir), tiny_tokenizer


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_steps_of_each_method_train_the_adapter(tmp_path, tiny_dir, tiny_tokenizer, method):
    torch.manual_seed(0)
    model, tok = _load(tiny_dir, tiny_tokenizer)
    cfg = _cfg(tmp_path, tiny_dir, method)
    res = run_baseline(cfg, model=model, tokenizer=tok, grade_fn=_alternating(), progress=False)
    assert res["steps"] == 2 and res["method"] == method
    w = load_file(str(tmp_path / f"bl-{method}" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in w.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it moved
    curve = [json.loads(l) for l in (tmp_path / f"bl-{method}" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2]
    assert curve[0]["generated_tokens"] > 0 and curve[0]["flops"] > 0 and "greedy" in curve[0]
    # 2 steps x 2 prompts x 2 generations were graded, and all were counted
    assert res["generated_tokens"] == curve[0]["generated_tokens"] <= 2 * 2 * 2 * 6
    exp = {"grpo-entropy": ("top_entropy_quantile", 0.2), "dr-grpo": ("loss_type", "dr_grpo")}
    if method in exp:
        k, v = exp[method]
        assert res["trl"][k] == v


def test_resume_continues_from_the_checkpoint_and_cap_stops(tmp_path, tiny_dir, tiny_tokenizer):
    model, tok = _load(tiny_dir, tiny_tokenizer)
    cfg = _cfg(tmp_path, tiny_dir, "grpo", eval_every=1)
    r1 = run_baseline(cfg, model=model, tokenizer=tok, grade_fn=_alternating(), progress=False)
    assert r1["steps"] == 2
    # the same limits again: a no-op
    assert run_baseline(cfg, model=model, tokenizer=tok, grade_fn=_alternating(), progress=False) == r1
    # a higher step limit resumes from checkpoint-2 (a fresh model object, as after a crash)
    model2, _ = _load(tiny_dir, tiny_tokenizer)
    cfg3 = _cfg(tmp_path, tiny_dir, "grpo", eval_every=1, max_steps=3)
    r2 = run_baseline(cfg3, model=model2, tokenizer=tok, grade_fn=_alternating(), progress=False)
    assert r2["steps"] == 3
    curve = [json.loads(l) for l in (tmp_path / "bl-grpo" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert curve[2]["generated_tokens"] > curve[1]["generated_tokens"] > curve[0]["generated_tokens"]
    # a different recipe in the same dir is refused
    with pytest.raises(ReasonMaxxerError, match="different config"):
        run_baseline(
            _cfg(tmp_path, tiny_dir, "grpo", eval_every=1, lr=1.0),
            model=model2,
            tokenizer=tok,
            grade_fn=_alternating(),
            progress=False,
        )


def test_wall_clock_cap_stops_after_the_first_step(tmp_path, tiny_dir, tiny_tokenizer):
    model, tok = _load(tiny_dir, tiny_tokenizer)
    cfg = _cfg(tmp_path, tiny_dir, "grpo", max_steps=5, max_train_seconds=1e-6)
    res = run_baseline(cfg, model=model, tokenizer=tok, grade_fn=_alternating(), progress=False)
    assert res["steps"] == 1
    assert [json.loads(l)["step"] for l in (tmp_path / "bl-grpo" / "curve.jsonl").read_text().splitlines()] == [1]


def test_config_file_and_bad_keys(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text('method = "rloo"\nlr = 3e-5\n[eval]\nn = 2\n')
    cfg = load_baseline_config(p, out="x")
    assert cfg.method == "rloo" and cfg.lr == 3e-5 and cfg.eval.n == 2 and cfg.out == "x"
    p.write_text("lrr = 1\n")
    with pytest.raises(ReasonMaxxerError, match=r"unknown key\(s\) \['lrr'\]"):
        load_baseline_config(p)
    with pytest.raises(ReasonMaxxerError, match="unknown method"):
        BaselineConfig(method="ppo")


def test_read_curve_drops_a_torn_last_line_only(tmp_path):
    from reasonmaxxer.recipes.baselines import _read_curve

    p = tmp_path / "curve.jsonl"
    assert _read_curve(p) == []  # not written yet
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "av')  # a crash tore the last write
    assert _read_curve(p) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')  # not a torn tail: an error
    with pytest.raises(ReasonMaxxerError, match=f"^{p}:2: invalid JSON"):
        _read_curve(p)
