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


def test_flops_cap_stops_and_a_larger_cap_resumes_the_run(tmp_path, tiny_dir, tiny_tokenizer):
    model, tok = _load(tiny_dir, tiny_tokenizer)
    cfg = _cfg(tmp_path, tiny_dir, "grpo", max_steps=5, max_train_flops=1.0)
    res = run_baseline(cfg, model=model, tokenizer=tok, grade_fn=_alternating(), progress=False)
    assert res["steps"] == 1 and res["max_train_flops"] == 1.0 and res["flops"] >= 1.0
    # the same cap again is a no-op; a larger one continues the same run from its checkpoint
    assert run_baseline(cfg, model=model, tokenizer=tok, grade_fn=_alternating(), progress=False) == res
    more = _cfg(tmp_path, tiny_dir, "grpo", max_steps=5, max_train_flops=res["flops"] * 1.5)
    model2, _ = _load(tiny_dir, tiny_tokenizer)
    res2 = run_baseline(more, model=model2, tokenizer=tok, grade_fn=_alternating(), progress=False)
    assert res2["steps"] == 2 and res2["flops"] > res["flops"]


def test_evaluations_at_flops_budgets_and_the_flops_cap(tmp_path):
    """One step counts 10 generated tokens = 2*10*10 + 6*10*10 = 800 FLOPs (N = 10, beta 0):
    budgets 1000 and 2000 are first reached at steps 2 and 3; the 3000 cap stops at step 4."""
    from transformers import TrainerControl

    from reasonmaxxer.recipes.baselines import _flops_progress, _make_clock

    ctx, calls = _clock_ctx(
        tmp_path, eval_every=0, eval_at_start=False, eval_at_flops=(1000.0, 2000.0), max_train_flops=3000.0
    )
    clock, bar = _make_clock(ctx), _flops_progress(ctx)
    args = type("A", (), {"output_dir": str(tmp_path / "trl")})()
    clock.on_train_begin(args, _State(True, step=0, max_steps=100), TrainerControl(), model=None)
    bar.on_train_begin(args, _State(True, step=0, max_steps=100), TrainerControl())
    stops, shown = [], []
    for step in range(1, 5):
        ctx.counters["generated_tokens"] = ctx.counters.get("generated_tokens", 0) + 10
        ctl = clock.on_step_end(args, _State(True, step=step, max_steps=100), TrainerControl(), model=None)
        bar.on_step_end(args, _State(True, step=step, max_steps=100), TrainerControl())
        stops.append(ctl.should_training_stop)
        shown.append(bar.training_bar.n)
    assert calls == [2, 3, 4]
    assert stops == [False, False, False, True]
    # the progress bar counts FLOPs of the cap (not steps of max_steps = 100), capped at 100%
    assert bar.training_bar.total == 3000.0 and shown == [800.0, 1600.0, 2400.0, 3000.0]


def test_config_file_and_bad_keys(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text('method = "rloo"\nlr = 3e-5\n[eval]\nn = 2\n')
    cfg = load_baseline_config(p, out="x")
    assert cfg.method == "rloo" and cfg.lr == 3e-5 and cfg.eval.n == 2 and cfg.out == "x"
    assert cfg.eval.max_new_tokens == 96 == cfg.max_new_tokens  # the defaults
    # the evaluation decodes as long as training generates, unless [eval] says otherwise
    assert load_baseline_config(p, max_new_tokens=192).eval.max_new_tokens == 192
    p.write_text("max_new_tokens = 160\n[eval]\nn = 2\n")
    assert load_baseline_config(p).eval.max_new_tokens == 160
    p.write_text("max_new_tokens = 160\n[eval]\nmax_new_tokens = 64\n")
    assert load_baseline_config(p, max_new_tokens=192).eval.max_new_tokens == 64
    # no [eval] table: the same rule, in the config itself (loaded or built in code)
    p.write_text("max_new_tokens = 160\n")
    assert load_baseline_config(p).eval.max_new_tokens == 160
    assert load_baseline_config(None, max_new_tokens=192).eval.max_new_tokens == 192
    assert BaselineConfig(max_new_tokens=192).eval == EvalConfig(max_new_tokens=192)
    assert BaselineConfig().eval == EvalConfig(n=4, temperature=0.7, greedy=True, max_new_tokens=96, batch_size=32)
    assert BaselineConfig(max_new_tokens=192, eval=EvalConfig(n=2)).eval.max_new_tokens == 256  # given: kept
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


# -- at scale: vLLM, gradient accumulation, processes, precision --------------------------------
def test_vllm_colocate_and_grad_accum_reach_grpo_config(tmp_path, monkeypatch):
    from reasonmaxxer.recipes.baseline_config import trl_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = BaselineConfig(
        out=str(tmp_path), prompts_per_step=4, num_generations=4, grad_accum=2,
        vllm="colocate", vllm_gpu_memory_utilization=0.45,
    )  # fmt: skip
    a = trl_args(cfg, tmp_path)
    assert a.use_vllm is True and a.vllm_mode == "colocate" and a.vllm_gpu_memory_utilization == 0.45
    # 16 completions per optimizer step, in 2 micro-batches of 8, generated once per step
    assert a.gradient_accumulation_steps == 2 and a.per_device_train_batch_size == 8
    assert a.steps_per_generation == 2 and a.generation_batch_size == 16
    srv = trl_args(BaselineConfig(out=str(tmp_path), vllm="server", vllm_server_url="http://h:8001"), tmp_path)
    assert srv.use_vllm and srv.vllm_mode == "server" and srv.vllm_server_base_url == "http://h:8001"
    off = trl_args(BaselineConfig(out=str(tmp_path)), tmp_path)
    assert off.use_vllm is False and off.gradient_accumulation_steps == 1 and off.per_device_train_batch_size == 16


def test_vllm_missing_is_one_clear_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a))
    with pytest.raises(ReasonMaxxerError, match=r"^baseline vllm = 'colocate': vllm is not installed; [^\n]*$"):
        run_baseline(BaselineConfig(out=str(tmp_path / "o"), vllm="colocate"), progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written


def test_effective_batch_is_checked_at_config_load(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    # 4 prompts x 4 generations = 16 completions per step over 3 micro-batches x 4 processes: no
    with pytest.raises(ReasonMaxxerError, match=r"^baseline grad_accum: .*\(16\).*\(3 x 4\)"):
        BaselineConfig(prompts_per_step=4, num_generations=4, grad_accum=3)
    p = tmp_path / "b.toml"
    p.write_text("grad_accum = 8\n")
    with pytest.raises(ReasonMaxxerError, match="grad_accum"):
        load_baseline_config(p)
    assert BaselineConfig(prompts_per_step=4, num_generations=4, grad_accum=2).grad_accum == 2  # 16 / (2 x 4)
    with pytest.raises(ReasonMaxxerError, match="vllm"):
        load_baseline_config(p, grad_accum=1, vllm="sometimes")


class _State:
    def __init__(self, main, step=1, max_steps=5):
        self.is_world_process_zero, self.global_step, self.max_steps = main, step, max_steps


def _clock_ctx(tmp_path, **kw):
    from reasonmaxxer.recipes.baselines import _EvalContext

    calls = []

    class Ctx(_EvalContext):
        def evaluate(self, m, step):
            calls.append(step)

    cfg = BaselineConfig(**{"out": str(tmp_path), "eval_every": 1, "eval_at_start": True, **kw})
    counters = {"train_seconds": 0.0, "eval_seconds": 0.0}
    return Ctx(cfg, tmp_path, None, [], None, counters, 10, 0.0, False), calls


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_evaluates_and_writes(tmp_path, main):
    from transformers import TrainerControl

    from reasonmaxxer.recipes.baselines import _make_clock

    ctx, calls = _clock_ctx(tmp_path, max_train_seconds=1e-9)
    clock = _make_clock(ctx)
    args = type("A", (), {"output_dir": str(tmp_path / "trl")})()
    (tmp_path / "trl" / "checkpoint-1").mkdir(parents=True)
    clock.on_train_begin(args, _State(main, step=0), TrainerControl(), model=None)
    ctl = clock.on_step_end(args, _State(main), TrainerControl(), model=None)
    clock.on_save(args, _State(main), ctl)
    assert calls == ([0, 1] if main else [])
    assert (tmp_path / "trl" / "checkpoint-1" / "reasonmaxxer_counters.json").exists() == main
    # the cap and the save are decided the same way on every process
    assert ctl.should_training_stop and ctl.should_save


def test_bf16_model_trains_fp32_weights(tmp_path, tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from reasonmaxxer.recipes.trl_scale import fp32_trainable

    for full in (False, True):
        m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
        cfg = _cfg(tmp_path, tiny_dir, "grpo", max_steps=1, full_finetune=full, out=str(tmp_path / f"ft-{full}"))
        run_baseline(cfg, model=m, tokenizer=tiny_tokenizer, grade_fn=_alternating(), progress=False)
        trained = [p for n, p in m.named_parameters() if full or "lora_" in n]
        assert trained and all(p.dtype == torch.float32 for p in trained)
        if not full:  # the frozen base stays bf16
            assert any(p.dtype == torch.bfloat16 for n, p in m.named_parameters() if "lora_" not in n)
    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    m.lm_head.weight.requires_grad_(False)
    assert fp32_trainable(m) > 0 and m.lm_head.weight.dtype == torch.bfloat16  # frozen: left as is


def test_a_run_dir_from_before_the_scale_keys_still_resumes(tmp_path, monkeypatch):
    from reasonmaxxer.data.benchmarks import load_problems
    from reasonmaxxer.recipes.baseline_config import check_run_dir

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tr, te = load_problems("arith:train:4"), load_problems("arith:test:2")
    cfg = BaselineConfig(out=str(tmp_path))
    check_run_dir(cfg, tmp_path, tr, te)
    p = tmp_path / "baseline_config.json"
    old = json.loads(p.read_text())
    for k in ("grad_accum", "vllm", "vllm_gpu_memory_utilization", "vllm_server_url"):
        del old["baseline"][k]
    p.write_text(json.dumps(old))
    assert check_run_dir(cfg, tmp_path, tr, te) is None  # the same run: accepted
    check_run_dir(BaselineConfig(out=str(tmp_path), vllm_gpu_memory_utilization=0.5), tmp_path, tr, te)
    with pytest.raises(ReasonMaxxerError, match="different config"):
        check_run_dir(BaselineConfig(out=str(tmp_path), grad_accum=2), tmp_path, tr, te)


def test_an_eval_key_that_is_not_a_table_is_one_clear_error(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text("max_new_tokens = 160\neval = 3\n")
    with pytest.raises(ReasonMaxxerError, match="eval"):
        load_baseline_config(p)
