"""benchmarks/method_study.py: the cells' order and the GRPO cells' rows at FLOPs budgets."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def study():
    spec = importlib.util.spec_from_file_location("method_study", ROOT / "benchmarks" / "method_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cells_run_reasonmaxxer_seed0_first_and_grpo_on_its_own_seeds(study):
    names = [c["name"] for c in study.cells("short", [0, 1], ["rft", "grpo", "reasonmaxxer", "all_tokens"], [0])]
    assert names == [
        "reasonmaxxer-s0",
        "reasonmaxxer-s1",
        "rft-s0",
        "rft-s1",
        "grpo-s0",
        "all_tokens-s0",
        "all_tokens-s1",
    ]
    assert study.stored_name({"method": "grpo", "seed": 0}) == "grpo@4x-s0"
    assert study.stored_name({"method": "rft", "seed": 2}) == "rft-s2"


def test_baseline_rows_take_the_first_evaluation_at_or_past_each_budget(study, tmp_path, monkeypatch):
    """Budget unit 15 FLOPs; evaluations at steps 2 (20 FLOPs), 3 (30), 5 (50), 7 (70): 1x is
    step 2, 2x step 3, 4x (60) step 7; the transfer column only on the last budget."""
    d = tmp_path / "short" / "grpo-s0"
    d.mkdir(parents=True)
    curve = [{"step": s, "flops": 10.0 * s, "train_seconds": s} for s in (7, 2, 3, 5)]
    (d / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))

    def fake_per_problem(p, which):
        step = int(p.name.split("-")[1]) if p.name.startswith("step-") else 0
        return {"a": step / 10, "b": 0.0}

    monkeypatch.setattr(study, "per_problem", fake_per_problem)
    monkeypatch.setattr(study, "reference_flops", lambda first: 15.0)
    rows = study.baseline_rows(d, "grpo", 0, tmp_path / "short" / "reasonmaxxer-s0")
    assert [(r["method"], r["steps"], r["flops"]) for r, _ in rows] == [
        ("grpo@1x", 2, 20.0),
        ("grpo@2x", 3, 30.0),
        ("grpo@4x", 7, 70.0),
    ]
    assert [r["avg_at_4"] for r, _ in rows] == pytest.approx([0.1, 0.15, 0.35])
    assert rows[0][1]["greedy"] == {"a": 0.2, "b": 0.0}
    assert [r["transfer_avg_at_4"] is not None for r, _ in rows] == [False, False, True]
    # a run stopped before its 4x evaluation gives the budgets it reached
    (d / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve[1:]))
    assert [r["method"] for r, _ in study.baseline_rows(d, "grpo", 0, tmp_path)] == ["grpo@1x", "grpo@2x"]
