#!/usr/bin/env bash
# Create ./.venv and install bitsearch into it (editable, with the test tools and the extras
# named in BITSEARCH_EXTRAS, comma-separated, e.g. BITSEARCH_EXTRAS=export).
#
# PyTorch: an already-installed torch is kept. Otherwise a torch wheel that lies on this
# machine (pip's find-links, e.g. a CPU build) is preferred; where there is none, pip installs
# its usual torch build. Nothing here pins an old or a CPU-only torch for anyone else.
#
# For the gguf extra, llama-cpp-python is built from source once (several minutes; AMX repacking
# off, it crashes on some CPUs) into ~/.cache/bitsearch/wheels, and that wheel is reused afterwards.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if ! python -m pip install -q --no-index --no-deps torch >/dev/null 2>&1; then
    python -m pip install -q torch
  fi
fi
for x in $(echo "${BITSEARCH_EXTRAS:-}" | tr ',' ' '); do
  if [ "$x" = gguf ] && ! python -c "import llama_cpp" >/dev/null 2>&1; then
    wheels="${BITSEARCH_WHEEL_CACHE:-$HOME/.cache/bitsearch/wheels}"
    mkdir -p "$wheels"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      echo "building llama-cpp-python once into $wheels (several minutes)"
      CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_AMX_INT8=OFF" python -m pip wheel -q --no-deps llama-cpp-python -w "$wheels"
    fi
    python -m pip install -q "$(ls -t "$wheels"/llama_cpp_python-*.whl | head -1)"
  fi
done
python -m pip install -q -e ".[dev${BITSEARCH_EXTRAS:+,$BITSEARCH_EXTRAS}]"
python -c "import torch, bitsearch; print(f'bitsearch {bitsearch.__version__} with torch {torch.__version__} in .venv')"
