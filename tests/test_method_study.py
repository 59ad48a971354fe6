"""benchmarks/method_study*.py: the cells' order, their configs, and the GRPO cells' rows at FLOPs budgets."""

import importlib
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def design(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("method_study_design")


@pytest.fixture
def study(design):
    """The results module (aggregation), whose functions the tests patch."""
    mod = importlib.import_module("method_study_results")
    assert importlib.import_module("method_study").aggregate is mod.aggregate  # the entry point's
    return mod


def cell_configs(design, by: dict, root: Path, first: Path):
    """name -> the loaded run config of that cell's TOML (written under `root`)."""
    from reasonmaxxer.config import load_run_config

    def cfg(name: str):
        p = root / f"{name}.toml"
        p.write_text(design.cell_config(by[name], root, first))
        return load_run_config(p)

    return cfg


def test_cells_run_reasonmaxxer_seed0_first_then_the_budgets_and_grpo_on_its_own_seeds(design):
    todo = design.cells("short", [0, 1], ["rft", "grpo", "reasonmaxxer", "all_tokens"], [0], [0])
    assert [c["name"] for c in todo] == [
        "reasonmaxxer-s0",
        "reasonmaxxer-s1",
        "rft-s0",
        "rft-s1",
        "grpo-s0",
        "reasonmaxxer@2x-s0",
        "rft@2x-s0",
        "reasonmaxxer@4x-s0",
        "rft@4x-s0",
        "all_tokens-s0",
        "all_tokens-s1",
    ]
    by = {c["name"]: c for c in todo}
    assert by["rft@2x-s0"]["label"] == "rft@2x" and by["rft@2x-s0"]["budget"] == 2
    assert by["grpo-s0"]["budget"] == 1  # its 4x is a FLOPs cap (stored as grpo@4x), not 4x the problems
    assert design.stored_name(by["grpo-s0"]) == "grpo@4x-s0"
    assert design.stored_name(by["rft-s1"]) == "rft-s1" and design.stored_name(by["rft@4x-s0"]) == "rft@4x-s0"


def test_data_replicates_sample_afresh_and_rft_reuses_reasonmaxxers_of_the_same_replicate(design, tmp_path):
    """--data-seeds 1 2: ReasonMaxxer and RFT (training seed 0) on rollouts sampled with the
    regime's sampling seed + k, after the budgets; RFT copies ReasonMaxxer's of the same k (not
    the shared rollouts), only when seed 0 is selected."""
    from reasonmaxxer.config import load_run_config

    todo = design.cells("long", [0], ["reasonmaxxer", "rft", "positive_only"], [0], [], data_seeds=[1, 2])
    names = [c["name"] for c in todo]
    assert names == [
        "reasonmaxxer-s0",
        "rft-s0",
        "reasonmaxxer.d1-s0",
        "rft.d1-s0",
        "positive_only.d1-s0",
        "reasonmaxxer.d2-s0",
        "rft.d2-s0",
        "positive_only.d2-s0",
        "positive_only-s0",
    ]
    # given before ReasonMaxxer, an ablation's replicate still comes after ReasonMaxxer's of its k
    first = design.cells("long", [0], ["positive_only", "reasonmaxxer"], [0], [], data_seeds=[1])
    assert [c["name"] for c in first][1:3] == ["reasonmaxxer.d1-s0", "positive_only.d1-s0"]
    assert [c["name"] for c in design.cells("long", [1], ["rft"], data_seeds=[1])] == ["reasonmaxxer-s0", "rft-s1"]
    by = {c["name"]: c for c in todo}
    first = tmp_path / "long" / "reasonmaxxer-s0"
    cfg = cell_configs(design, by, tmp_path, first)

    seed = load_run_config(design.REGIMES["long"]["extends"]).sampling.seed
    assert cfg("reasonmaxxer.d2-s0").sampling.seed == seed + 2 and cfg("reasonmaxxer-s0").sampling.seed == seed
    assert cfg("reasonmaxxer.d2-s0").reuse == str(first)  # the base evaluation only: other sampling inputs
    assert design.sampling_sibling(by["rft.d1-s0"], tmp_path) == tmp_path / "long" / "reasonmaxxer.d1-s0"
    (tmp_path / "long" / "reasonmaxxer.d1-s0").mkdir(parents=True)
    assert cfg("rft.d1-s0").reuse == str(tmp_path / "long" / "reasonmaxxer.d1-s0")
    assert cfg("rft.d1-s0").sampling.seed == seed + 1 and cfg("rft.d1-s0").train.variant == "rft"
    po = cfg("positive_only.d1-s0")
    assert po.reuse == str(tmp_path / "long" / "reasonmaxxer.d1-s0") and po.sampling.seed == seed + 1
    assert po.train.variant == cfg("positive_only-s0").train.variant != cfg("reasonmaxxer.d1-s0").train.variant
    assert design.stored_name(by["rft.d1-s0"]) == "rft.d1-s0" and by["rft.d1-s0"]["label"] == "rft.d1"


def test_a_dir_made_with_another_config_is_stale_and_stops_the_study(design, tmp_path, monkeypatch):
    """A cell's dir whose run_config.json differs from what the cell's config now sets (the
    random-reward seeds made before their permutations had their own seeds, or a run made before the
    regime's config file changed) is "stale": the study
    stops naming it, instead of taking its row for the cell's. Seeds and replicates given twice
    give their cells once; a data replicate k < 1 is refused."""
    entry = importlib.import_module("method_study")
    cell = [c for c in design.cells("long", [1], ["random_reward"]) if c["name"] == "random_reward-s1"][0]
    d = tmp_path / "long" / "random_reward-s1"
    d.mkdir(parents=True)
    made = {"selection": {"seed": 0, "rewards": "shuffled"}, "train": {"seed": 1}, "eval": {"n": 4}}
    made |= {k: v for k, v in design.REGIMES["long"].items() if k not in ("extends", "transfer_problems")}
    (d / "run_config.json").write_text(json.dumps(made))
    src = tmp_path / "long" / "reasonmaxxer-s0"
    assert entry.stale(cell, d, src) == "selection.seed 0, now 1"
    assert entry.cell_state(cell, d, set(), src) == "stale: selection.seed 0, now 1"
    made["selection"]["seed"] = 1
    (d / "run_config.json").write_text(json.dumps(made))
    assert entry.stale(cell, d, src) is None and entry.cell_state(cell, d, set(), src) == "todo"
    # the resolved config counts, not only the keys the cell's TOML sets: a value the regime's
    # config file (or a default) gives otherwise is stale; what a run sets per call is not
    from reasonmaxxer.config import load_run_config

    lr = load_run_config(design.REGIMES["long"]["extends"]).train.lr
    made["train"] |= {"lr": lr * 2}
    made |= {"threads": 7, "out": "elsewhere"}
    (d / "run_config.json").write_text(json.dumps(made))
    assert entry.stale(cell, d, src) == f"train.lr {lr * 2!r}, now {lr!r}"
    made["train"]["lr"] = lr
    (d / "run_config.json").write_text(json.dumps(made))
    assert entry.stale(cell, d, src) is None
    made["selection"]["seed"] = 0
    (d / "run_config.json").write_text(json.dumps(made))
    monkeypatch.setattr(entry, "save", lambda *a: None)
    with pytest.raises(SystemExit, match=r"(?s)another config .*random_reward-s1: stale: selection.seed 0, now 1"):
        entry.main(["--root", str(tmp_path), "--regime", "long", "--methods", "random_reward", "--seeds", "1"])
    names = [c["name"] for c in design.cells("long", [0, 0], ["rft"], [0], [], data_seeds=[1, 1])]
    assert names == ["reasonmaxxer-s0", "rft-s0", "rft.d1-s0"]
    with pytest.raises(SystemExit):
        entry.main(["--plan", "--data-seeds", "0"])


def test_every_selection_starts_from_reasonmaxxer_seed0_whose_stores_the_others_copy(design):
    """`--methods positive_only random_gate --seeds 1` must not make positive_only-s1 the cell
    whose base stores (and base pack) every other cell copies."""
    todo = design.cells("short", [1], ["positive_only", "random_gate"], [0], [0])
    assert [c["name"] for c in todo] == ["reasonmaxxer-s0", "positive_only-s1", "random_gate-s1"]
    assert todo[0]["method"] == "reasonmaxxer" and todo[0]["budget"] == 1
    assert [c["name"] for c in design.cells("short", [2, 0], ["reasonmaxxer"])][:1] == ["reasonmaxxer-s0"]


def test_budget_cells_run_only_for_selected_seeds(design):
    """`--methods rft --seeds 1` is RFT seed 1 (after the reference cell), not also RFT's seed-0
    2x/4x cells; `--seeds 1 --budget-seeds 1` selects seed 1's budget cells."""
    names = lambda todo: [c["name"] for c in todo]  # noqa: E731
    assert names(design.cells("long", [1], ["rft"], [0], [0])) == ["reasonmaxxer-s0", "rft-s1"]
    assert names(design.cells("long", [1], ["rft"], [0], [1])) == [
        "reasonmaxxer-s0",
        "rft-s1",
        "rft@2x-s1",
        "rft@4x-s1",
    ]
    assert "rft@2x-s0" in names(design.cells("long", [0, 1, 2], ["rft"]))  # the defaults: seed 0's


def test_cell_configs_scale_the_problems_and_reuse_the_cell_that_samples_alike(design, tmp_path):
    """Each cell's TOML loads as a run config; a 2x cell trains on 160 problems (the 80 first),
    RFT's reuses ReasonMaxxer@2x's rollouts, ReasonMaxxer@2x only the first cell's base eval."""

    todo = design.cells(
        "short", [0, 1], ["reasonmaxxer", "rft", "faithful", "positive_only", "random_reward"], [0], [0]
    )
    by = {c["name"]: c for c in todo}
    first = tmp_path / "short" / "reasonmaxxer-s0"
    cfg = cell_configs(design, by, tmp_path, first)

    assert cfg("reasonmaxxer-s0").reuse is None
    # a source whose dir is gone (finished in an earlier session): the first cell's base eval only
    assert cfg("rft@2x-s0").reuse == str(first) and cfg("faithful-s1").reuse == str(first)
    for name in ("reasonmaxxer@2x-s0", "faithful-s0"):
        (tmp_path / "short" / name).mkdir(parents=True)
    assert cfg("rft-s1").reuse == str(first) and cfg("rft-s1").train.seed == 1
    assert cfg("rft-s1").train_problems == design.REGIMES["short"]["train_problems"]
    two = cfg("rft@2x-s0")
    assert two.train_problems == f"arith:train:160:{design.TRAIN_TIERS}" and two.train.variant == "rft"
    assert two.reuse == str(tmp_path / "short" / "reasonmaxxer@2x-s0")
    assert cfg("reasonmaxxer@4x-s0").reuse == str(first)
    assert cfg("reasonmaxxer@4x-s0").train_problems.startswith("arith:train:320:")
    assert cfg("faithful-s0").reuse == str(first) and cfg("faithful-s0").sampling.n == 16
    assert cfg("faithful-s1").reuse == str(tmp_path / "short" / "faithful-s0")
    assert cfg("positive_only-s1").train.variant == "positive_only_paper"  # the "(paper)"
    assert cfg("positive_only-s1").reuse == str(first)
    # the random-reward control: each seed its own permutation of the labels; others: selection seed 0
    assert cfg("random_reward-s1").selection.seed == 1 and cfg("random_reward-s1").selection.rewards == "shuffled"
    assert cfg("random_reward-s0").selection.seed == 0 and cfg("rft-s1").selection.seed == 0
    from reasonmaxxer.data.benchmarks import load_problems

    ids = [p.id for p in load_problems(two.train_problems)]
    assert ids[:80] == [p.id for p in load_problems(cfg("rft-s1").train_problems)]
    with pytest.raises(SystemExit, match="cannot scale the problem spec 'gsm8k'"):
        design.scaled_problems("gsm8k", 2)


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
    monkeypatch.setattr(study, "reference_flops", lambda first, regime: 15.0)
    rows = study.baseline_rows(d, "grpo", 0, tmp_path / "short" / "reasonmaxxer-s0")
    assert [(r["method"], r["steps"], r["flops"]) for r, _ in rows] == [
        ("grpo@1x", 2, 20.0),
        ("grpo@2x", 3, 30.0),
        ("grpo@4x", 7, 70.0),
    ]
    assert [r["avg_at_4"] for r, _ in rows] == pytest.approx([0.1, 0.15, 0.35])
    assert rows[0][1]["greedy"] == {"a": 0.2, "b": 0.0}
    assert [r["transfer_avg_at_4"] is not None for r, _ in rows] == [False, False, False]  # not finished
    (d / "transfer").mkdir()
    (d / "transfer" / "eval.json").write_text("{}")  # written last, when the transfer eval has finished
    rows = study.baseline_rows(d, "grpo", 0, tmp_path / "short" / "reasonmaxxer-s0")
    assert [r["transfer_avg_at_4"] is not None for r, _ in rows] == [False, False, True]
    # a run stopped before its 4x evaluation gives the budgets it reached
    (d / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve[1:]))
    assert [r["method"] for r, _ in study.baseline_rows(d, "grpo", 0, tmp_path)] == ["grpo@1x", "grpo@2x"]


def test_results_are_kept_per_regime_and_the_length_column_appears_where_measured(study):
    assert study.result_paths("short")["json"].name == "method_study.json"  # the first regime's names
    long = study.result_paths("long")
    assert (long["json"].name, long["md"].name, long["png"].name) == (
        "method_study_long.json",
        "method_study_long.md",
        "accuracy_vs_flops_long.png",
    )
    row = {"seed": 0, "avg_at_4": 0.5, "base_avg_at_4": 0.25, "greedy": 0.5, "flops": 1e12}
    row |= {"transfer_avg_at_4": None, "transfer_base_avg_at_4": None}
    res = {"regime": "long", "design": {"test_problems": "t", "transfer_problems": "x"}}
    res |= {"cells_pending": [], "not_in_study_yet": []}
    md = study.markdown({**res, "rows": [{**row, "method": "reasonmaxxer"}]})
    assert "tokens (base)" not in md and "Not in the study yet" not in md
    rows = [{**row, "method": "reasonmaxxer", "mean_tokens": 81.25, "base_mean_tokens": 90.5}]
    rows.append({**row, "method": "grpo@1x"})  # a baseline row: no length
    lines = study.markdown({**res, "rows": rows}).splitlines()
    assert lines[2].endswith("| FLOPs | tokens (base) |") and lines[3].endswith("---:|---:|")
    assert lines[4].endswith("| 1e+12 | 81.2 (90.5) |") and lines[5].endswith("| 1e+12 | - |")


def test_a_later_session_takes_the_first_cells_stores_from_the_committed_base_pack(design, tmp_path, monkeypatch):
    """The finished first cell's base stores are copied once to the regime's pack; a session
    without the first cell's dir, whose results are committed, reads the pack (and its transfer
    base evaluation) instead of re-running it; without committed results it runs it."""
    study = importlib.import_module("method_study")
    monkeypatch.setattr(design, "RESULTS", tmp_path / "results")
    first_cell = design.cells("short", [0], ["reasonmaxxer", "rft"])[0]
    first = tmp_path / "runs" / "short" / "reasonmaxxer-s0"
    for rel in design.PACK_FILES + ("train/adapter",):
        if rel.endswith(".json"):
            (first / rel).parent.mkdir(parents=True, exist_ok=True)
            (first / rel).write_text(json.dumps({"template": "fewshot", "eval": {"max_new_tokens": 7}}))
        else:
            (first / rel).mkdir(parents=True)
            (first / rel / "manifest.json").write_text(rel)
    (first / "rollouts" / "manifest.lock").write_text("")
    (first.parent / "transfer_base" / "samples").mkdir(parents=True)
    (first.parent / "transfer_base" / "eval.json").write_text("{}")
    pack = design.pack_dir("short")
    assert study.export_pack(first, "short") is None  # not finished: nothing copied
    (first / "summary.json").write_text("{}")
    (first.parent / "transfer_base" / "eval.json").unlink()
    assert study.export_pack(first, "short") is None  # the transfer base evaluation not there yet
    (first.parent / "transfer_base" / "eval.json").write_text("{}")
    assert study.export_pack(first, "short") == pack and study.export_pack(first, "short") is None
    assert (pack / "eval/base/greedy/manifest.json").read_text() == "eval/base/greedy"
    assert (pack / "transfer_base" / "eval.json").is_file() and (pack / "timings.json").is_file()
    assert not (pack / "train").exists() and not (pack / "rollouts" / "manifest.lock").exists()
    assert not list(pack.parent.glob("*.tmp")) and [p.name for p in pack.parent.iterdir()] == ["short"]

    later = tmp_path / "later" / "short" / "reasonmaxxer-s0"  # a new session: no runs
    assert design.base_source("short", first_cell, later, set()) == later  # nothing committed: run it
    assert design.base_source("short", first_cell, later, {"reasonmaxxer-s0"}) == pack
    assert design.base_source("short", first_cell, first, {"reasonmaxxer-s0"}) == first  # its dir is here
    assert study.prompt_of(later.parent / "grpo-s0", pack) == ("fewshot", 7)
    assert study.copy_tree(pack / "transfer_base", later.parent / "transfer_base")
    assert (later.parent / "transfer_base" / "eval.json").is_file()
    assert not study.copy_tree(pack / "transfer_base", later.parent / "transfer_base")  # there already


def test_a_cell_stopped_before_its_transfer_eval_resumes_there_without_rerunning(design, tmp_path, monkeypatch):
    """A cell whose `run` finished but whose transfer evaluation did not (a crash, a stop) is not
    "done": the study runs only its transfer evaluation, and the base pack waits for it."""
    study = importlib.import_module("method_study")
    monkeypatch.setattr(design, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(study, "pack_dir", design.pack_dir)
    cell = design.cells("short", [0], ["reasonmaxxer"])[0]
    d = tmp_path / "runs" / "short" / "reasonmaxxer-s0"
    d.mkdir(parents=True)
    from reasonmaxxer.config import load_run_config

    made = load_run_config(design.REGIMES["short"]["extends"])  # as the cell's run recorded it
    cfg = {"model": made.model, "template": made.template, "eval": {"max_new_tokens": made.eval.max_new_tokens}}
    (d / "run_config.json").write_text(json.dumps(cfg))
    (d / "summary.json").write_text("{}")
    (d / "timings.json").write_text("{}")
    for rel in ("rollouts", "eval/base/samples", "eval/base/greedy"):
        (d / rel).mkdir(parents=True)
    assert design.finished(cell, d) and not design.done(cell, d)
    assert study.cell_state(cell, d, {"reasonmaxxer-s0"}, d) == "transfer eval left"
    assert study.export_pack(d, "short") is None  # its transfer evaluation is not there yet
    calls = []

    class FakePopen:
        def __init__(self, cmd, cwd, stdout, stderr):
            calls.append((cmd[3], cmd[cmd.index("--threads") + 1]))
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text("{}")

        def wait(self):
            return 0

    monkeypatch.setattr(study.subprocess, "Popen", FakePopen)
    study.run_cell(cell, tmp_path / "runs", d, 3)
    # the trained model's and the base's, no second `run`; with the cell's threads
    assert calls == [("eval", "3"), ("eval", "3")] and not study.CHILDREN
    assert design.done(cell, d) and study.cell_state(cell, d, set(), d) == "done"
    assert study.export_pack(d, "short") == design.pack_dir("short")
    other = design.cells("short", [0], ["rft"])[1]
    assert study.cell_state(other, d.parent / "rft-s0", {"rft-s0"}, d) == "stored"
    assert study.cell_state(other, d.parent / "rft-s0", set(), d) == "todo"


def test_aggregating_one_method_keeps_the_committed_rows_of_the_others(study, tmp_path, monkeypatch):
    """`--methods positive_only` re-saves the results: the committed RFT row (outside the
    selection) stays, paired again with ReasonMaxxer from the kept per-problem values, and the
    pending list is the whole study's, not only the selection's."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    row = {"avg_at_4": 0.5, "base_avg_at_4": 0.25, "greedy": 0.5, "flops": 1e12}
    rows = [{**row, "method": "reasonmaxxer", "seed": 0}, {**row, "method": "rft", "seed": 0, "avg_at_4": 0.75}]
    (tmp_path / "method_study.json").write_text(json.dumps({"rows": rows}))
    acc = {"reasonmaxxer-s0": {"p1": 0.5, "p2": 0.5}, "rft-s0": {"p1": 1.0, "p2": 0.5}}
    probs = {k: {"avg_at_4": v, "greedy": v} for k, v in acc.items()}
    (tmp_path / "method_study_problems.json").write_text(json.dumps(probs))
    res, _ = study.aggregate(tmp_path / "runs", "short", [0], ["positive_only"])
    by = {(r["method"], r["seed"]): r for r in res["rows"]}
    assert set(by) == {("reasonmaxxer", 0), ("rft", 0)} and by[("rft", 0)]["carried"]
    assert by[("rft", 0)]["avg_at_4_vs_reasonmaxxer"]["mean_diff"] == pytest.approx(0.25)
    assert {"positive_only-s0", "rft-s1", "faithful-s2", "grpo@4x-s0"} <= set(res["cells_pending"])
    assert "rft-s0" not in res["cells_pending"] and res["cells_pending"][0] == "positive_only-s0"
    # a GRPO run of the selection restarted here (its dir has a curve) that has reached only 1x:
    # the committed 2x row of the earlier run is not mixed in beside the new run's 1x row
    rows.append({**row, "method": "grpo@2x", "seed": 0})
    (tmp_path / "method_study.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "runs" / "short" / "grpo-s0").mkdir(parents=True)
    (tmp_path / "runs" / "short" / "grpo-s0" / "curve.jsonl").write_text("")
    new = {**row, "method": "grpo@1x", "seed": 0}
    monkeypatch.setattr(study, "baseline_rows", lambda d, method, seed, first: [(new, {})])
    res, _ = study.aggregate(tmp_path / "runs", "short", [0], ["grpo"])
    assert sorted(r["method"] for r in res["rows"]) == ["grpo@1x", "reasonmaxxer", "rft"]
    res, _ = study.aggregate(tmp_path / "runs", "short", [0], ["rft"])  # outside the selection: committed rows kept
    assert sorted(r["method"] for r in res["rows"]) == ["grpo@2x", "reasonmaxxer", "rft"]


def test_a_data_replicate_is_paired_with_reasonmaxxer_on_the_same_rollouts_and_pooled(study, tmp_path, monkeypatch):
    """rft.d1 against reasonmaxxer.d1 (not against seed 0's ReasonMaxxer); RFT's replicates 0 and
    1 pooled against ReasonMaxxer's 0 and 1, problem by problem; the table says so."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    acc = {
        "reasonmaxxer-s0": [0.5, 0.5, 0.0, 0.0],
        "rft-s0": [1.0, 0.5, 0.0, 0.0],
        "reasonmaxxer.d1-s0": [0.0, 0.0, 0.0, 0.0],
        "rft.d1-s0": [1.0, 1.0, 0.0, 0.0],
    }
    probs = {k: {m: {f"p{i}": x for i, x in enumerate(v)} for m in ("avg_at_4", "greedy")} for k, v in acc.items()}
    row = {
        "greedy": 0.5,
        "base_avg_at_4": 0.25,
        "flops": 1e12,
        "transfer_avg_at_4": None,
        "transfer_base_avg_at_4": None,
    }
    rows = [{**row, "method": k.rsplit("-s", 1)[0], "seed": 0, "avg_at_4": sum(v) / 4} for k, v in acc.items()]
    (tmp_path / "method_study.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "method_study_problems.json").write_text(json.dumps(probs))
    res, _ = study.aggregate(tmp_path / "runs", "short", [0], ["positive_only"])
    by = {r["method"]: r for r in res["rows"]}
    assert by["rft.d1"]["avg_at_4_vs_reasonmaxxer"]["mean_diff"] == pytest.approx(0.5)  # 0.5 - 0.0
    assert by["rft"]["avg_at_4_vs_reasonmaxxer"]["mean_diff"] == pytest.approx(0.125)
    assert "avg_at_4_vs_reasonmaxxer" not in by["reasonmaxxer.d1"]
    pd = res["pooled_data"]
    assert pd["rft"]["replicates"] == [0, 1] and pd["reasonmaxxer"]["replicates"] == [0, 1]
    assert pd["rft"]["avg_at_4_vs_reasonmaxxer"]["mean_diff"] == pytest.approx((0.125 + 0.5) / 2)
    assert [r["method"] for r in res["rows"]] == ["reasonmaxxer", "reasonmaxxer.d1", "rft", "rft.d1"]
    assert pd["rft"]["each"]["avg_at_4_vs_reasonmaxxer"] == [pytest.approx(0.125), pytest.approx(0.5)]
    md = study.markdown(res)
    assert "| rft | 0, 1 | 4 |" in md.split("Data replicates pooled")[1]
    # the t interval over the two replicates' differences: 0.3125 +- t(1) 12.706 * 0.375 / 2
    assert pd["rft"]["between"]["avg_at_4_vs_reasonmaxxer"] == pytest.approx([0.3125, -2.0699, 2.6949], abs=1e-4)
    rft_line = md.split("Data replicates pooled")[1].split("| rft |")[1].split("\n")[0]
    assert "| +12.5 / +50.0; t [-207.0, +269.5] |" in rft_line
    assert "| +50.0 [" in md and "(vs reasonmaxxer.d1) |" in md.split("| rft.d1 |")[1].split("\n")[0]
    assert study.family("rft.d1") == study.family("rft@2x") == "rft" and study.data_tag("rft@2x") == ""


def test_reasonmaxxer_at_2x_is_paired_with_its_1x_run_and_a_replicate_with_none(study, tmp_path, monkeypatch):
    """reasonmaxxer@2x against ReasonMaxxer at 1x (what doubling its budget buys); ReasonMaxxer's
    own rows and its data replicates (which would be paired with themselves) get no such column."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    acc = {
        "reasonmaxxer-s0": [0.5, 0.5, 0.0, 0.0],
        "reasonmaxxer@2x-s0": [1.0, 0.5, 0.5, 0.0],
        "reasonmaxxer.d1-s0": [0.0, 0.0, 0.0, 0.0],
    }
    probs = {k: {m: {f"p{i}": x for i, x in enumerate(v)} for m in ("avg_at_4", "greedy")} for k, v in acc.items()}
    row = {"greedy": 0.5, "base_avg_at_4": 0.25, "flops": 1e12, "transfer_avg_at_4": None}
    rows = [{**row, "method": k.rsplit("-s", 1)[0], "seed": 0, "avg_at_4": sum(v) / 4} for k, v in acc.items()]
    (tmp_path / "method_study.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "method_study_problems.json").write_text(json.dumps(probs))
    by = {r["method"]: r for r in study.aggregate(tmp_path / "runs", "short", [0], ["positive_only"])[0]["rows"]}
    assert by["reasonmaxxer@2x"]["avg_at_4_vs_reasonmaxxer"]["mean_diff"] == pytest.approx(0.25)  # 0.5 - 0.25
    assert not any("avg_at_4_vs_reasonmaxxer" in by[m] for m in ("reasonmaxxer", "reasonmaxxer.d1"))


def test_larger_budgets_are_also_paired_with_reasonmaxxer_at_the_same_budget(study):
    """grpo@2x against reasonmaxxer@2x (not only against ReasonMaxxer at 1x); 1x rows, the
    ReasonMaxxer rows and rows without a same-budget ReasonMaxxer get no such pairing."""
    acc = {"reasonmaxxer@2x-s0": [0.5, 0.5, 0.0, 0.0], "grpo@2x-s0": [1.0, 1.0, 0.0, 0.0], "rft@4x-s0": [1, 1, 1, 1]}
    acc |= {"grpo@1x-s0": [1, 1, 1, 1]}
    probs = {k: {m: dict(enumerate(v)) for m in ("avg_at_4", "greedy")} for k, v in acc.items()}
    rows = [{"method": k.rsplit("-s", 1)[0], "seed": 0} for k in acc]
    study.same_budget(rows, probs)
    by = {r["method"]: r for r in rows}
    assert by["grpo@2x"]["avg_at_4_vs_reasonmaxxer_same_budget"]["mean_diff"] == pytest.approx(0.25)
    assert not any("avg_at_4_vs_reasonmaxxer_same_budget" in by[m] for m in ("reasonmaxxer@2x", "rft@4x", "grpo@1x"))
    row = {"avg_at_4": 0.5, "base_avg_at_4": 0.25, "greedy": 0.5, "flops": 1e12, "transfer_avg_at_4": None}
    res = {"regime": "short", "design": {"test_problems": "t", "transfer_problems": "x"}, "cells_pending": []}
    res |= {"not_in_study_yet": [], "rows": [{**row, **r, "transfer_base_avg_at_4": None} for r in rows]}
    md = study.markdown(res)
    assert "| grpo@2x | 0 | +25.0 [" in md.split("At the same budget")[1]


def test_a_second_study_process_on_the_same_cells_stops_with_one_line(design, tmp_path, monkeypatch):
    """The cells of a regime are run by one process at a time: a second one (another terminal, a
    resumed session) exits naming the lock instead of running a cell twice into one run dir."""
    from filelock import FileLock

    entry = importlib.import_module("method_study")
    ran = []
    monkeypatch.setattr(entry, "run_cell", lambda *a, **k: ran.append(a) or 0.0)
    monkeypatch.setattr(entry, "save", lambda *a: None)  # the committed results stay as they are
    held = FileLock(tmp_path / ".short.lock")
    held.acquire()
    try:
        with pytest.raises(SystemExit, match=r"another process is running the short cells .*\.short\.lock"):
            entry.main(["--root", str(tmp_path), "--methods", "random_gate", "--seeds", "1"])
    finally:
        held.release()
    assert ran == []


def test_seeds_are_pooled_per_problem_where_both_methods_kept_them(study):
    """rft seeds 0-1 pooled against ReasonMaxxer seeds 0-1 (rft-s2 has no ReasonMaxxer seed 2;
    random_reward one seed; a 2x row is not a seed of a 1x method; GRPO's 1x row is), each
    metric on the problems all its inputs share: hand-computed averages."""
    from reasonmaxxer.core.stats import paired_bootstrap

    def parse(values: str) -> dict:
        return {k: float(v) for k, v in (kv.split("=") for kv in values.split())}

    def acc(avg: str, greedy: str | None = None) -> dict:
        return {"avg_at_4": parse(avg)} | ({"greedy": parse(greedy)} if greedy else {})

    probs = {
        "base": acc("a=0 b=0 c=.5 d=.5 e=.5"),  # e: only the base has it
        "reasonmaxxer-s0": acc("a=.5 b=0 c=.5 d=.5", "a=1 b=0 c=1 d=0"),
        "reasonmaxxer-s1": acc("a=.25 b=.25 c=.5 d=.5", "a=0 b=0 c=1 d=1"),
        "rft-s0": acc("a=1 b=.5 c=.5 d=.5", "a=1 b=1 c=1 d=0"),
        "rft-s1": acc("a=.75 b=.75 c=.5", "a=1 b=1 c=0 d=1"),  # d's avg@4 missing
        "rft-s2": acc("a=0 b=0 c=0 d=0"),
        "random_reward-s0": acc("a=1 b=1 c=1 d=1"),
        "rft@2x-s1": acc("a=1 b=1 c=1 d=1"),
        "grpo@1x-s0": acc("a=1 b=1 c=1 d=1"),
        "grpo@1x-s1": acc("a=1 b=1 c=1 d=1"),
    }
    rows = [{"method": k.rsplit("-s", 1)[0], "seed": int(k.rsplit("-s", 1)[1])} for k in probs if k != "base"]
    rows.append({"method": "rft@2x", "seed": 0})
    pooled = study.pooled(rows, probs)
    assert set(pooled) == {"reasonmaxxer", "rft", "grpo@1x"} and pooled["rft"]["seeds"] == [0, 1]
    # avg@4 on a, b, c: rft .875 .625 .5 (mean 2/3); ReasonMaxxer .375 .125 .5 (1/3); base 0 0 .5 (1/6)
    rft = pooled["rft"]
    assert rft["n"] == 3 and rft["avg_at_4_vs_reasonmaxxer"]["n"] == 3
    assert rft["avg_at_4_vs_reasonmaxxer"]["mean_diff"] == pytest.approx(1 / 3)
    by_hand = paired_bootstrap({"a": 0.875, "b": 0.625, "c": 0.5}, {"a": 0.375, "b": 0.125, "c": 0.5})
    assert (rft["avg_at_4_vs_reasonmaxxer"]["low"], rft["avg_at_4_vs_reasonmaxxer"]["high"]) == (
        by_hand["low"],
        by_hand["high"],
    )
    assert rft["avg_at_4_vs_base"]["mean_diff"] == pytest.approx(0.5)
    # greedy on a-d: rft 1 1 .5 .5 (.75); ReasonMaxxer .5 0 1 .5 (.5)
    assert rft["greedy_vs_reasonmaxxer"]["mean_diff"] == pytest.approx(0.25) and rft["greedy_vs_reasonmaxxer"]["n"] == 4
    rmx = pooled["reasonmaxxer"]  # a-d: .375 .125 .5 .5 against the base's 0 0 .5 .5
    assert rmx["n"] == 4 and rmx["avg_at_4_vs_base"]["mean_diff"] == pytest.approx(0.125)
    assert "avg_at_4_vs_reasonmaxxer" not in rmx and "greedy_vs_reasonmaxxer" not in pooled["grpo@1x"]
    res = {"regime": "long", "design": {"test_problems": "t", "transfer_problems": "x"}, "rows": []}
    md = study.markdown(res | {"cells_pending": [], "not_in_study_yet": [], "pooled": pooled})
    assert "| rft | 0, 1 | 3 | +50.0 [" in md and "| +33.3 [" in md.split("| rft | 0, 1 |")[1]


def test_grpo_cells_are_evaluated_as_the_reasonmaxxer_cells(design, tmp_path):
    """A GRPO cell's --config is the first cell's [eval] table: in `long`, 192 new tokens (the
    baseline's own default, 96, would count every longer solution wrong), the same seed and n."""
    from reasonmaxxer.recipes.baseline_config import load_baseline_config

    for regime in ("short", "long"):
        first = ROOT / "benchmarks" / "results" / "method_study_base" / regime
        rc = json.loads((first / "run_config.json").read_text())
        p = tmp_path / f"{regime}.toml"
        p.write_text(design.baseline_cell_config(rc["eval"], regime))
        cfg = load_baseline_config(p, max_new_tokens=rc["sampling"]["max_new_tokens"], method="grpo")
        ev = cfg.eval
        assert {k: getattr(ev, k) for k in rc["eval"]} == {**rc["eval"], "stop": tuple(rc["eval"]["stop"])}
    assert ev.max_new_tokens == 192 and ev.n == 4 and ev.seed == 1234
    assert cfg.grad_accum == 4 and cfg.prompts_per_step * cfg.num_generations == 16  # 4 micro-batches of 4


def test_cells_run_side_by_side_with_jobs_after_the_cells_they_copy(design, tmp_path, monkeypatch, capsys):
    """--jobs 2: two cells at once (each logging to <cell>.log, the regime dir made here), after
    the cells whose stores they copy (the first cell, when there is no base pack: alone, with
    every thread; rft@2x after reasonmaxxer@2x)."""
    import threading

    entry = importlib.import_module("method_study")
    todo = design.cells("long", [0, 1], ["reasonmaxxer", "rft", "random_gate"])
    names = [c["name"] for c in todo]
    root, events, both = tmp_path / "runs", [], threading.Barrier(2, timeout=10)

    def fake_run_cell(cell, root_, src, threads, log=None):
        events.append(("start", cell["name"], threads, Path(log.name).name))
        if cell["name"] in names[1:3]:
            both.wait()  # returns only when the two run at the same time
        events.append(("end", cell["name"]))
        return 1.0

    monkeypatch.setattr(entry, "run_cell", fake_run_cell)
    src = root / "long" / names[0]  # no base pack: the first cell's own dir
    done = [c["name"] for c, _ in entry.run_cells(todo[:3], root, src, 1, 2, alone_threads=0)]
    assert events[:2] == [("start", names[0], 0, f"{names[0]}.log"), ("end", names[0])]  # alone, all threads
    assert sorted(done) == sorted(names[:3]) and {e[2] for e in events[2:] if e[0] == "start"} == {1}
    assert (root / "long" / f"{names[1]}.log").is_file()
    # with a base pack: rft@2x-s0 waits for reasonmaxxer@2x-s0 (its rollouts), random_gate does not
    events.clear()
    by = {c["name"]: c for c in design.cells("long", [0], ["reasonmaxxer", "rft", "random_gate"])}
    order = [by["reasonmaxxer@2x-s0"], by["rft@2x-s0"], by["random_gate-s0"]]
    assert entry.waits_for(by["rft@2x-s0"], root, root / "pack") == {
        root / "pack",
        root / "long" / "reasonmaxxer@2x-s0",
    }
    gate, beside = threading.Event(), threading.Event()

    def fake_deps(cell, root_, src, threads, log=None):
        events.append(("start", cell["name"]))
        if cell["name"] == "reasonmaxxer@2x-s0":
            beside.wait(10)  # random_gate starts beside it (it copies nothing of it)
        if cell["name"] == "random_gate-s0":
            beside.set()
            gate.wait(10)  # reasonmaxxer@2x finishes, then rft@2x starts beside random_gate
        if cell["name"] == "rft@2x-s0":
            gate.set()
        events.append(("end", cell["name"]))
        return 1.0

    monkeypatch.setattr(entry, "run_cell", fake_deps)
    list(entry.run_cells(order, root, root / "pack", 1, 2))
    # a GRPO cell copies nothing: it waits for no offline 4x cell
    grpo = design.cells("long", [0], ["grpo", "reasonmaxxer"])
    assert {c["name"]: entry.waits_for(c, root, root / "pack") for c in grpo}["grpo-s0"] == {root / "pack"}
    assert events.index(("start", "rft@2x-s0")) > events.index(("end", "reasonmaxxer@2x-s0"))
    assert events.index(("start", "random_gate-s0")) < events.index(("end", "reasonmaxxer@2x-s0"))
    assert gate.is_set()
    # of the ready cells, the one the queued cells wait for starts first, whatever the order
    capsys.readouterr()
    monkeypatch.setattr(entry, "run_cell", lambda *a, **k: 1.0)
    list(entry.run_cells([by["random_gate-s0"], by["rft@2x-s0"], by["reasonmaxxer@2x-s0"]], root, root / "pack", 1, 2))
    started = [ln.split()[2] for ln in capsys.readouterr().out.splitlines() if "started" in ln]
    assert started == ["long/reasonmaxxer@2x-s0", "long/random_gate-s0", "long/rft@2x-s0"]


def test_a_failed_cell_stops_new_ones_and_an_interrupt_stops_the_running_commands(design, tmp_path, monkeypatch):
    """A failed cell lets the one beside it finish and starts no other, then raises; a caller
    that stops iterating (an exception in its loop) terminates the commands still running."""
    import threading

    entry = importlib.import_module("method_study")
    todo = design.cells("long", [0, 1], ["reasonmaxxer", "random_gate"])
    root, events = tmp_path / "runs", []
    boom = {**todo[1], "name": "boom"}

    def fake_slow(cell, root_, src, threads, log=None):
        events.append(("start", cell["name"]))
        if cell["name"] == "boom":
            raise RuntimeError("cell failed")
        threading.Event().wait(0.2)  # still running when the other fails
        events.append(("end", cell["name"]))
        return 1.0

    monkeypatch.setattr(entry, "run_cell", fake_slow)
    got = []
    with pytest.raises(RuntimeError, match="cell failed"):
        for c, _ in entry.run_cells([todo[1], boom, todo[2]], root, root / "pack", 1, 2):
            got.append(c["name"])
    assert got == [todo[1]["name"]] and ("start", todo[2]["name"]) not in events

    events.clear()
    monkeypatch.setattr(entry, "STOPPING", threading.Event())

    def fake_cmd(cell, root_, src, threads, log=None):  # a real command, run as the cells' are
        events.append(("start", cell["name"]))
        if cell["name"] != todo[0]["name"]:
            entry.call([sys.executable, "-c", "import time; time.sleep(60)"], 0, log)
        return 1.0

    monkeypatch.setattr(entry, "run_cell", fake_cmd)
    t0, cells = time.time(), entry.run_cells(todo[:3], root, root / "pack", 1, 2)
    assert next(cells)[0]["name"] == todo[0]["name"]  # the quick one; the next sleeps beside it
    while not entry.CHILDREN:
        time.sleep(0.05)
    (proc,) = entry.CHILDREN
    cells.close()  # the caller's loop stops here (an exception in it): GeneratorExit at the yield
    assert proc.returncode is not None and time.time() - t0 < 30 and not entry.CHILDREN
    assert ("start", todo[2]["name"]) not in events and entry.STOPPING.is_set()
