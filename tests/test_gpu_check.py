"""benchmarks/gpu_check: the GPU benchmark's Python part runs end to end on a tiny CPU model,
and the shell wrapper refuses a Python without CUDA torch with a clear message."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_tiny_on_cpu(tmp_path, capsys):
    out = _module().main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    r = out["results"]
    assert r["sample"]["tokens"] == 4 * 2 * 8 and r["sample"]["tokens_per_s"] > 0  # no EOS: every row runs to the cap
    assert r["score"]["tokens"] > r["sample"]["tokens"] and r["score"]["tokens_per_s"] > 0
    assert r["train"]["steps"] == 2 and r["train"]["s_per_step"] > 0
    assert "skipped" in r["vllm"]  # vllm is not installed here
    assert json.loads((tmp_path / "r.json").read_text())["results"]["train"]["steps"] == 2
    assert "| train |" in capsys.readouterr().out


def test_gpu_check_sh_needs_cuda_torch():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "no CUDA-enabled torch" in p.stderr
