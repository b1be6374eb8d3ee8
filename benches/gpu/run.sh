#!/usr/bin/env bash
# The GPU check: run on a machine with one GPU (see README, "GPU checks").
# Expects, carried in .carry/: the abi3 wheel (pie_rs-*.whl) and the pie-cuda
# test binary (cuda-tests). Installs the wheel with --no-deps, runs the CUDA
# tests (Rust and Python) and the GPU benchmarks, and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pie-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-index --target /tmp/pie-site .carry/pie_rs-*.whl || exit 1
export PYTHONPATH=/tmp/pie-site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
status=()
echo "== Rust CUDA tests (pie-cuda)"
if timeout 60 ./.carry/cuda-tests --test-threads=1 2>&1 | tee "$OUT/rust-tests.log" | tail -3; then
  status+=("rust cuda tests: $(grep -E '^test result' "$OUT/rust-tests.log" | tail -1)")
else
  status+=("rust cuda tests: FAILED")
fi
echo "== Python CUDA tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests -x -W ignore 2>&1 | tee "$OUT/py-tests.log" | tail -15
status+=("python cuda tests: $(tail -1 "$OUT/py-tests.log")")
echo "== copy bandwidth"
timeout 90 python3 benches/gpu/copy_bench.py "$OUT/copy.json" 2>&1 | tee "$OUT/copy.md"
echo "== end-to-end decode"
timeout 170 python3 benches/gpu/e2e_bench.py "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.md"
echo
echo "===== summary ($(date -u +%Y-%m-%d), $(cat "$OUT/gpu.txt"))"
printf '%s\n' "${status[@]}"
cat "$OUT/copy.md"
cat "$OUT/e2e.md"
