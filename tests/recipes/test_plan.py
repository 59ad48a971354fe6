"""`reasonmaxxer run CONFIG --dry-run` (recipes/plan.py): counts checked against hand counts."""

import math
from pathlib import Path

import pytest

import reasonmaxxer
from reasonmaxxer.config import load_run_config
from reasonmaxxer.data.arith import generate
from reasonmaxxer.data.prompts import get_template, render_prompt
from reasonmaxxer.recipes.model_shapes import KNOWN_SHAPES, lora_params, n_params
from reasonmaxxer.recipes.plan import plan, render_plan

CONFIGS = Path(reasonmaxxer.__file__).parent / "configs"

# SmolLM2-135M-Instruct (the converted embedded checkpoint's config.json), written out by hand
SMOL = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
QWEN_MATH = KNOWN_SHAPES["Qwen/Qwen2.5-Math-1.5B"]  # its Hub config.json


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.delenv("REASONMAXXER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data: Hub-only specs stay unloaded


def test_parameter_counts_by_hand():
    # per layer: q, k, v, o + MLP (3 x hidden x intermediate) + 2 norms; embeddings tied; final norm
    smol = 30 * (576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576) + 49152 * 576 + 576
    assert n_params(SMOL) == smol == 134_515_008
    # qwen2: q/k/v biases (1536 + 2 x 256)
    qwen = 28 * (2 * 1536 * 1536 + 2 * 1536 * 256 + 1536 + 512 + 3 * 1536 * 8960 + 2 * 1536) + 151936 * 1536 + 1536
    assert n_params(QWEN_MATH) == qwen == 1_543_714_304
    # qwen3: no biases, q/k norms (2 x head_dim), head_dim 128 with 16 / 8 heads
    q3 = 28 * (1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 256 + 3 * 1024 * 3072 + 2 * 1024) + 151936 * 1024 + 1024
    assert n_params(KNOWN_SHAPES["Qwen/Qwen3-0.6B"]) == q3 == 596_049_920
    # LoRA r32 on q, k, v, o: r x (in + out) per projection per layer
    assert lora_params(QWEN_MATH, 32, ("q_proj", "k_proj", "v_proj", "o_proj")) == 28 * 32 * (
        (1536 + 1536) + 2 * (1536 + 256) + (1536 + 1536)
    )


def test_reference_plan_matches_hand_counts():
    cfg = load_run_config(CONFIGS / "arith.toml")
    p = plan(cfg, shape=SMOL, count_tokens=len)  # one "token" per character: countable by hand
    N = 134_515_008
    tmpl = get_template("fewshot")

    def mean_prompt(split, n):
        qs = [pr.question for pr in generate(split, n, seed=0)]
        return sum(len(render_prompt(tmpl, q)) for q in qs) / n

    tr, te, va = mean_prompt("train", 80), mean_prompt("test", 96), mean_prompt("validation", 32)
    assert [p["sets"][k]["count"] for k in ("train", "validation", "test")] == [80, 32, 96]
    st = {s["name"]: s for s in p["stages"]}
    # sample: 80 problems x n=4, each prompt + 96 new tokens
    s = st["sample"]
    assert s["rows"] == 320
    assert s["tokens"] == {"prompt": pytest.approx(320 * tr), "generated": 320 * 96}
    assert s["flops"] == pytest.approx(2 * N * 320 * (tr + 96))
    # select: min(80, 64 problems) x 4 rollouts, keep_shortest 1.0; the HF sampler's entropies: no re-scoring
    assert st["select + score"]["rows"] == 256 and st["select + score"]["flops"] == 0
    # train: 2 epochs x 256 = 512 sequences / (8 x 1) = 64 steps; 6N trained + 2N anchor forward
    t = st["train"]
    assert (t["rows"], t["steps"]) == (512, 64)
    assert t["flops"] == pytest.approx(6 * N * 512 * (tr + 96) + 2 * N * 512 * (tr + 96))
    # validation: a greedy pass over 32 problems at 64 // 13 + 1 = 5 checkpoints
    v = st["validate (one completion a problem, per checkpoint)"]
    assert (v["checkpoints"], v["rows"]) == (5, 160)
    assert v["flops"] == pytest.approx(2 * N * 160 * (va + 96))
    # eval: 96 problems x (4 samples + greedy), base and trained
    for name in ("eval base", "eval trained"):
        assert st[name]["rows"] == 480 and st[name]["flops"] == pytest.approx(2 * N * 480 * (te + 96))
    assert p["total"]["flops"] == pytest.approx(sum(x["flops"] for x in p["stages"]))
    # A100: 312e12 peak; 30% sampling, 40% training; $2/h
    assert s["gpu_hours"] == pytest.approx(s["flops"] / (312e12 * 0.3) / 3600)
    assert t["gpu_hours"] == pytest.approx(t["flops"] / (312e12 * 0.4) / 3600)
    assert p["total"]["dollars"] == pytest.approx(2.0 * p["total"]["gpu_hours"])
    assert p["warnings"] == []


def test_paper_plan_matches_hand_counts():
    cfg = load_run_config(CONFIGS / "paper" / "qwen2.5-math-1.5b.toml")
    p = plan(cfg, shape=QWEN_MATH, count_tokens=lambda text: 150)  # 150-token prompts
    N = 1_543_714_304
    sets = p["sets"]
    assert [sets[k]["count"] for k in ("train", "validation", "test")] == [300, 60, 500]
    assert "pick" in sets["train"]["count_source"] and "published" in sets["test"]["count_source"]
    gen = 4096 - 150  # the 4096-token context cuts max_new_tokens = 8192
    st = {s["name"]: s for s in p["stages"]}
    assert st["sample"]["rows"] == 300 * 20
    assert st["sample"]["flops"] == pytest.approx(2 * N * 6000 * (150 + gen))
    # 50 problems x 20 x 0.8 = 800 rows, scored by HF (vLLM sampled them)
    assert st["select + score"]["rows"] == 800
    assert st["select + score"]["flops"] == pytest.approx(2 * N * 800 * 4096)
    # 2 epochs x 800 / 8 = 200 steps, stopped at 149: 149 x 8 sequences
    t = st["train"]
    assert (t["steps"], t["rows"]) == (149, 1192)
    assert t["flops"] == pytest.approx(8 * N * 1192 * 4096)
    # memory: bf16 weights + 16 B per LoRA param + 34 B activations + the chunked loss's buffers
    # (4 fp32 [1024, V] blocks + an fp32 head: 1 x 4096 x V fp32 logits would be 2.5 GB > 1 GiB)
    lora = 28 * 32 * 9728
    chunked = 4 * 1024 * 151936 * 4 + 151936 * 1536 * 4
    assert t["memory_bytes"] == pytest.approx(2 * N + 16 * lora + 4096 * 1536 * 28 * 34 + chunked)
    v = st["validate (one completion a problem, per checkpoint)"]
    assert (v["checkpoints"], v["rows"]) == (10, 600)  # 149 steps, every 15: 9 + the last
    assert st["eval base"]["rows"] == 500 * 4  # avg@4, no greedy
    assert any("[sampling] max_new_tokens" in w and "4096" in w for w in p["warnings"])
    assert not any(w.startswith("DOES NOT FIT") for w in p["warnings"])


def test_a_config_that_cannot_fit_names_the_knob():
    cfg = load_run_config(
        CONFIGS / "paper" / "qwen2.5-math-1.5b.toml", **{"train.micro_batch": 8, "train.grad_accum": 1}
    )
    p = plan(cfg, shape=QWEN_MATH, count_tokens=lambda text: 150, gpu_memory_gb=40)
    misfits = [w for w in p["warnings"] if w.startswith("DOES NOT FIT")]
    assert len(misfits) == 1 and "train" in misfits[0] and "[train] micro_batch" in misfits[0]
    assert "\n" not in misfits[0] and "40 GB" in misfits[0]
    assert misfits[0] in render_plan(p)


def test_unknown_counts_say_unknown_and_gpu_choices():
    cfg = load_run_config(CONFIGS / "demo.toml", train_problems="simplerl:train")  # Hub-only, no pick
    p = plan(cfg, shape=SMOL, count_tokens=len, gpu="H100")
    assert p["sets"]["train"]["count"] is None and p["total"]["flops"] is None
    text = render_plan(p)
    assert "unknown (Hub-only data, not on disk)" in text and "989 TFLOP/s" in text and "$3.00/GPU-hour" in text
    p2 = plan(load_run_config(CONFIGS / "demo.toml"), shape=SMOL, count_tokens=len, gpu="H100", dollars_per_hour=1.0)
    assert p2["total"]["dollars"] == pytest.approx(p2["total"]["gpu_hours"])
    assert math.isclose(p2["stages"][0]["gpu_hours"], p2["stages"][0]["flops"] / (989e12 * 0.3) / 3600)


def test_run_dry_run_prints_the_plan_and_runs_nothing(monkeypatch, capsys):
    import reasonmaxxer.recipes.run as run_mod
    from reasonmaxxer.cli import main

    def boom(*a, **k):
        raise AssertionError("dry run ran the pipeline")

    monkeypatch.setattr(run_mod, "run_pipeline", boom)
    main(["run", str(CONFIGS / "paper" / "qwen2.5-math-1.5b.toml"), "--dry-run", "--gpu", "H100"])
    out = capsys.readouterr().out
    assert "dry run" in out and "| train (149 steps) |" in out and "1,543,714,304 parameters" in out
