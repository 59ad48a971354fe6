#!/usr/bin/env bash
# GPU path check: on one GPU, sampling (HFSampler, and VLLMSampler when vllm is installed),
# teacher-forced scoring and a few ReasonMaxxer training steps (LoRA r32) in bf16 on a
# Qwen2-0.5B-shaped model built from a config (random weights: no Hub access needed).
# Prints tokens/s and s/step; ~3-5 minutes on one recent GPU (the Python part is capped at
# 7.5 minutes). See benchmarks/gpu_check.py for the workload.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py flags, e.g. --no-vllm --max-new-tokens 512]
#
# It runs on the machine's own Python with a CUDA build of torch ($PYTHON, default python3):
# scripts/bootstrap.sh is for CPU machines (it pins the CPU torch). The benchmark runs from
# this checkout; only if a dependency is missing does it `pip install -e .`, with torch pinned
# to the installed build so that pip never replaces it. vllm is never installed here (its
# wheels pin their own torch): install `reasonmaxxer[vllm]` yourself to get the vLLM row.
# Results also go to $OUT/gpu_check.json (default runs/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: $PY has no CUDA-enabled torch (torch missing, a CPU-only build, or no GPU visible)." >&2
    echo "gpu_check: install a CUDA build of torch (https://pytorch.org) or set PYTHON to an interpreter that has one." >&2
    exit 1
fi
"$PY" -c 'import torch; print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s), using {torch.cuda.get_device_name(0)}")'

missing=$("$PY" - <<'PYEOF'
import importlib.util
from importlib import metadata

need = ["transformers", "tokenizers", "safetensors", "peft", "accelerate", "pyarrow", "numpy", "tqdm"]
out = [m for m in need if importlib.util.find_spec(m) is None]
if "transformers" not in out and int(metadata.version("transformers").split(".")[0]) < 5:
    out.append("transformers>=5")
print(" ".join(out))
PYEOF
)
if [ -n "$missing" ]; then
    torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
    echo "gpu_check: missing or too old: $missing -> pip install -e . (torch pinned to $torch_version)"
    if ! "$PY" -m pip install -q -e . "torch==$torch_version"; then
        echo "gpu_check: pip install failed (no package index reachable?); install these into $PY first: $missing" >&2
        exit 1
    fi
fi
"$PY" -c 'import vllm; print(f"gpu_check: vllm {vllm.__version__}")' 2>/dev/null \
    || echo "gpu_check: vllm not installed: the vLLM row will be skipped"

out="${OUT:-runs}/gpu_check.json"
exec timeout 450 "$PY" benchmarks/gpu_check.py --json "$out" "$@"
