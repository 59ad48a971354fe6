"""compare: synthetic run dirs with known numbers; compute-to-match exact, incl. "not reached"."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from reasonmaxxer.cli import main
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.recipes.compare import compute_to_match, read_run, run_compare

CURVE = [
    {"step": 10, "train_seconds": 100.0, "flops": 1e12, "avg_at_n": 0.30, "greedy": 0.40},
    {"step": 20, "train_seconds": 200.0, "flops": 2e12, "avg_at_n": 0.45, "greedy": 0.50},
    {"step": 30, "train_seconds": 300.0, "flops": 3e12, "avg_at_n": 0.52, "greedy": 0.48},
]


def test_compute_to_match_first_crossing():
    m = compute_to_match(CURVE, 0.45, "avg_at_n", ref_flops=1e11, ref_seconds=50.0)
    assert m == {"reached": True, "step": 20, "flops_ratio": 20.0, "wall_ratio": 4.0, "lower_bound": False}
    # greedy crosses 0.5 at step 20 too, and a later dip does not matter
    assert compute_to_match(CURVE, 0.5, "greedy", 1e11, 50.0)["step"] == 20


def test_compute_to_match_not_reached_is_a_lower_bound_at_the_curve_end():
    m = compute_to_match(CURVE, 0.6, "avg_at_n", ref_flops=1e11, ref_seconds=50.0)
    assert m == {"reached": False, "step": 30, "flops_ratio": 30.0, "wall_ratio": 6.0, "lower_bound": True}
    assert compute_to_match([], 0.6, "avg_at_n", 1e11, 50.0)["flops_ratio"] is None


def _eval_json(path, avg, greedy, mean_tokens=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "mean_tokens": mean_tokens,
                "strict": {
                    "avg_at_n": {"value": avg, "low": avg - 0.1, "high": avg + 0.1, "n": 10},
                    "greedy": {"value": greedy, "low": greedy - 0.1, "high": greedy + 0.1, "n": 10},
                },
            }
        )
    )


def make_rm_run(d, *, n_params=(10, 10), avg=0.45, greedy=0.5, variant="reasonmaxxer", reuse=None):
    """A ReasonMaxxer run dir with known numbers: a 10x10 weight (N = 100), 2 rollouts with
    prompts of 4 tokens and completions of 2 and 3 tokens (13 sampled tokens), 2 training
    steps of 6 + 4 tokens, lam > 0 (reference forward on the 10 trained tokens), no validation."""
    (d / "train" / "merged").mkdir(parents=True)
    save_file({"w": torch.zeros(*n_params)}, str(d / "train" / "merged" / "model.safetensors"))
    (d / "run_config.json").write_text(
        json.dumps(
            {
                "train": {"lam": 0.2, "variant": variant, "gate": "entropy"},
                "validation_problems": "",
                "eval": {"max_new_tokens": 8},
                "reuse": reuse,
            }
        )
    )
    (d / "timings.json").write_text(
        json.dumps({"sample": 30.0, "select + score": 0.0, "train": 70.0, "eval base": 20.0, "eval trained": 25.0})
    )
    (d / "train" / "result.json").write_text(json.dumps({"total_steps": 2, "history": []}))
    # step 2 is an older log line without "tokens": 40 tok/s x 0.1 s = 4 tokens
    (d / "train" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 6, "tokens_per_s": 60.0, "seconds": 0.1})
        + "\n"
        + json.dumps({"step": 2, "tokens_per_s": 40.0, "seconds": 0.1})
        + "\n"
    )
    (d / "rollouts" / "shards").mkdir(parents=True)
    (d / "rollouts" / "manifest.json").write_text(json.dumps({"generated_tokens": 5, "config_hash": "h1"}))
    pq.write_table(
        pa.table({"prompt_ids": [[1, 2, 3, 4], [1, 2, 3, 4]], "token_ids": [[5, 6], [7, 8, 9]]}),
        d / "rollouts" / "shards" / "shard-00000.parquet",
    )
    _eval_json(d / "eval" / "trained" / "eval.json", avg, greedy, mean_tokens=2.5)
    _eval_json(d / "eval" / "base" / "eval.json", 0.3, 0.4)  # an eval.json written without a length
    return d


def make_baseline_run(d, curve, method="grpo"):
    d.mkdir(parents=True)
    (d / "baseline_config.json").write_text("{}")
    last = curve[-1]
    (d / "result.json").write_text(
        json.dumps(
            {
                "method": method,
                "n_params": 100,
                "steps": last["step"],
                "train_seconds": last["train_seconds"],
                "eval_seconds": 12.0,
                "generated_tokens": 1000,
                "trained_tokens": 3000,
                "forward_tokens": 3000,
                "flops": last["flops"],
                "max_train_seconds": None,
            }
        )
    )
    (d / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return d


def test_reasonmaxxer_run_compute_is_counted_by_hand(tmp_path):
    r = read_run(make_rm_run(tmp_path / "rm"))
    assert r["n_params"] == 100
    # forward: 13 sampled tokens + 10 reference tokens; trained: 10
    assert r["forward_tokens"] == 23 and r["trained_tokens"] == 10
    assert r["flops"] == 2 * 100 * 23 + 6 * 100 * 10
    assert r["method_seconds"] == 100.0 and r["eval_seconds"] == 45.0
    # each evaluation's mean completion length, as its eval.json has it (absent: not there)
    assert r["mean_tokens"] == 2.5 and "mean_tokens" not in r["base"]
    assert r["avg_at_n"] == 0.45 and r["base"]["greedy"] == 0.4


def test_compare_table_and_ratios(tmp_path):
    rm = make_rm_run(tmp_path / "rm")  # flops 10600, 100 s
    reached = make_baseline_run(
        tmp_path / "grpo",
        [
            {"step": 5, "train_seconds": 500.0, "flops": 53000.0, "avg_at_n": 0.40},
            {"step": 10, "train_seconds": 2500.0, "flops": 212000.0, "avg_at_n": 0.46},
        ],
    )
    never = make_baseline_run(
        tmp_path / "rloo", [{"step": 5, "train_seconds": 900.0, "flops": 106000.0, "avg_at_n": 0.40}], method="rloo"
    )
    md = run_compare([str(rm), str(reached), str(never)], tmp_path / "out", gpu_hour_price=3.6)
    c = json.loads((tmp_path / "out" / "compare.json").read_text())
    g, r = c["rows"][1], c["rows"][2]
    assert g["compute_to_match"] == {
        "reached": True,
        "step": 10,
        "flops_ratio": 20.0,
        "wall_ratio": 25.0,
        "lower_bound": False,
    }
    assert r["compute_to_match"]["lower_bound"] and r["compute_to_match"]["flops_ratio"] == 10.0
    assert c["rows"][0]["cost_usd"] == pytest.approx(0.1)  # 100 s at $3.6/h
    assert "| grpo |" in md and "20.0x" in md and ">= 10.0x (not reached)" in md
    assert (tmp_path / "out" / "accuracy_vs_compute.png").stat().st_size > 1000


def test_compare_errors(tmp_path, capsys):
    b = make_baseline_run(tmp_path / "grpo", CURVE)
    with pytest.raises(ReasonMaxxerError, match="no ReasonMaxxer run"):
        run_compare([str(b)], tmp_path / "out")
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run dir" in err[0]


def test_a_running_baseline_is_read_from_its_curve(tmp_path):
    rm = make_rm_run(tmp_path / "rm")
    d = tmp_path / "grpo"
    d.mkdir()
    (d / "baseline_config.json").write_text(json.dumps({"baseline": {"method": "grpo", "max_train_seconds": 5000.0}}))
    row = {
        "step": 6,
        "train_seconds": 300.0,
        "eval_seconds": 40.0,
        "n_params": 100,
        "generated_tokens": 10,
        "trained_tokens": 30,
        "forward_tokens": 30,
        "flops": 21200.0,
        "avg_at_n": 0.3,
    }
    (d / "curve.jsonl").write_text(json.dumps(row) + "\n")
    md = run_compare([str(rm), str(d)], tmp_path / "out")
    c = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert c["rows"][1]["method"] == "grpo (partial)" and c["rows"][1]["steps"] == 6
    assert c["rows"][1]["compute_to_match"]["flops_ratio"] == 2.0 and c["rows"][1]["compute_to_match"]["lower_bound"]
    assert ">= 2.0x (not reached)" in md
    (d / "curve.jsonl").write_text("")
    with pytest.raises(ReasonMaxxerError, match="no evaluated step"):
        run_compare([str(rm), str(d)], tmp_path / "out")


def test_an_ablation_with_reused_rollouts_is_charged_their_sampling_time(tmp_path):
    src = make_rm_run(tmp_path / "demo")
    abl = make_rm_run(tmp_path / "abl", variant="rft", reuse=str(tmp_path / "demo"))
    t = json.loads((abl / "timings.json").read_text())
    (abl / "timings.json").write_text(json.dumps({**t, "sample": 0.1}))  # copied, not sampled
    r = read_run(abl)
    assert r["seconds"][f"sample (in {src})"] == 30.0 and r["method_seconds"] == 100.0
    # rft has no anchor: no reference forward; 13 sampled + 0 reference tokens
    assert r["forward_tokens"] == 13 and r["method"] == "rft"


def test_bad_jsonl_in_a_run_is_a_one_line_error(tmp_path):
    rm = make_rm_run(tmp_path / "rm")
    b = make_baseline_run(tmp_path / "grpo", CURVE)
    curve = b / "curve.jsonl"
    good = curve.read_text()
    curve.write_text(good + "[1]\n")
    n = good.count("\n") + 1
    with pytest.raises(ReasonMaxxerError, match=f"^{curve}:{n}: expected a JSON object, got list$"):
        run_compare([str(rm), str(b)], tmp_path / "out")
    curve.write_text(good)
    metrics = rm / "train" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": "\xff"}\n')
    with pytest.raises(ReasonMaxxerError, match=f"^{metrics}: not UTF-8 text \\(byte 0xff at byte offset"):
        run_compare([str(rm), str(b)], tmp_path / "out")
