"""CLI: bad input gives one line on stderr and a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, module="reasonmaxxer.cli"):
    env = dict(os.environ, TQDM_DISABLE="1")
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


def test_models_lists_the_embedded_default():
    r = run("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout


def test_analyze_rejects_a_missing_tuned_model(tmp_path):
    _one_line_error(run("analyze", "--tuned", str(tmp_path / "nope"), "--out", str(tmp_path / "a")), "no such model")
