#!/usr/bin/env bash
# Creates .venv (once), installs the Python dependencies (pip's cache is reused
# across runs) and builds the extension in release mode into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch from PyPI is large: it is installed once into .venv and then reused.
# accelerate: tensor parallel on CPU (tests/test_tensor_parallel.py).
python -m pip install -q "torch>=2.6" "transformers>=5.17" numpy tqdm matplotlib pytest ruff "maturin>=1.7,<2" "accelerate>=1.0"
# pie-rs serve (tests/test_serve_http.py): the serving extras of the installed transformers,
# pinned to its version so that pip does not replace it, and prometheus_client for /metrics.
TF_VERSION=$(python -c 'import transformers; print(transformers.__version__)')
python -m pip install -q "transformers[serving]==$TF_VERSION" "prometheus_client>=0.20"
# transformers 5.17 (the oldest supported, and the GPU machine's) beside the
# newest, for the version matrix in scripts/test-all.sh.
TF517=.cache/transformers-5.17
TF517_PKGS=("transformers==5.17.0" "huggingface-hub>=1.5,<2" httpx httpcore certifi)
if [ "$(cat "$TF517/.installed" 2>/dev/null)" != "${TF517_PKGS[*]}" ]; then
  rm -rf "$TF517"
  python -m pip install -q --no-deps --target "$TF517" "${TF517_PKGS[@]}"
  echo "${TF517_PKGS[*]}" > "$TF517/.installed"
fi
maturin develop --release -q

