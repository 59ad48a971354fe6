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
    """Every stage of the GPU check runs on a tiny bf16 model on the CPU (the GPU paths: bf16
    weights, fp32 head, fp32 master weights, bf16 export, the one-line out-of-memory)."""
    mod = _module()
    stages = ",".join(s for s in mod.STAGES if s != "pipeline")  # the pipeline stage: ~1 min on 2 cores
    out = mod.main(
        ["--tiny", "--device", "cpu", "--dtype", "bfloat16", "--stages", stages, "--json", str(tmp_path / "r.json")]
    )
    r = out["results"]
    assert not [k for k, v in r.items() if "error" in v], {k: v["error"] for k, v in r.items() if "error" in v}
    assert r["sample"]["tokens"] == 4 * 2 * 8 and r["sample"]["tokens_per_s"] > 0  # no EOS: every row runs to the cap
    assert r["score"]["tokens"] > r["sample"]["tokens"] and r["score"]["all_finite"]
    assert r["score_long"]["tokens"] == 2 * 96
    assert r["train_lora"]["steps"] == 2 and r["train_lora"]["base_handed_back"]
    assert r["train_lora"]["export_dtype"] == "bfloat16"
    m = r["merge_agreement"]
    assert m["positions"] > 0 and 0 <= m["bf16_merged"]["agree_with_fp32"] <= 1
    assert r["train_full"]["moved_fraction"] > 0.95 and r["train_full"]["export_dtype"] == "bfloat16"
    assert r["oom"]["message"].startswith("train: out of memory")
    assert "skipped" in r["vllm"]  # vllm is not installed here
    assert json.loads((tmp_path / "r.json").read_text())["results"]["train_lora"]["steps"] == 2
    assert "| train_full |" in capsys.readouterr().out


def test_gpu_check_sh_needs_cuda_torch():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "no CUDA-enabled torch" in p.stderr
