#!/usr/bin/env bash
# The GPU check: run on a machine with one GPU (see README, "GPU checks").
# Expects, carried in .carry/: the abi3 wheel (pie_rs-*.whl) and the pie-cuda
# test binary (cuda-tests). Installs the wheel with --no-deps, runs the CUDA
# tests (Rust and Python) and the GPU benchmarks, and prints a short table last.
# Logs go to $WORK; a few results are copied to $OUT (the device tool brings
# back at most 8 files). The whole run keeps within BUDGET seconds (default 450).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pie-gpu-out}
WORK=/tmp/pie-gpu
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-index --target /tmp/pie-site .carry/pie_rs-*.whl || exit 1
export PYTHONPATH=/tmp/pie-site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$WORK/gpu.txt"
cat "$WORK/gpu.txt"
status=()
# The whole run stays within BUDGET seconds (7.5 minutes, so a rerun fits the device time):
# each step gets at most what is left, and a step with under 10 s left is skipped and says so.
BUDGET=${BUDGET:-450}
START=$SECONDS
cap() {
  local left=$(( BUDGET - (SECONDS - START) ))
  if [ "$left" -lt 10 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# run_step NAME SECONDS CMD...: runs CMD under `timeout`, or records that the budget ran out.
run_step() {
  local name=$1 t
  t=$(cap "$2")
  shift 2
  if [ "$t" -eq 0 ]; then
    status+=("$name: skipped (the ${BUDGET}s budget ran out)")
    return 124
  fi
  timeout "$t" "$@"
}
echo "== Rust CUDA tests (pie-cuda)"
run_step "rust cuda tests" 60 ./.carry/cuda-tests --test-threads=1 > "$WORK/rust-tests.log" 2>&1
status+=("rust cuda tests: $(grep -E '^test result' "$WORK/rust-tests.log" | tail -1)")
tail -3 "$WORK/rust-tests.log"
echo "== Python CUDA tests"
run_step "python cuda tests" 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests -W ignore > "$WORK/py-tests.log" 2>&1
tail -15 "$WORK/py-tests.log"
status+=("python cuda tests: $(tail -1 "$WORK/py-tests.log")")
echo "== copy bandwidth"
run_step "copy bench" 60 python3 benches/gpu/copy_bench.py "$WORK/copy.json" > "$WORK/copy.md" 2>&1
cat "$WORK/copy.md"
echo "== end-to-end decode"
run_step "e2e bench" 150 python3 benches/gpu/e2e_bench.py "$OUT/e2e.json" > "$WORK/e2e.md" 2>&1
cat "$WORK/e2e.md"
echo "== host attention: decode with every layer pooled, attended on the host vs copied vs resident (Llama-3-8B shapes, 8 layers, bf16)"
run_step "host attention bench" 60 python3 benches/gpu/host_attention_bench.py "$WORK/host-attn.json" --repeats 1 \
    > "$WORK/host-attn.md" 2>&1
status+=("host attention bench: exit $? ($(grep -c '| no (' "$WORK/host-attn.md") methods whose tokens differ)")
cat "$WORK/host-attn.md"
echo "== host attention kernel vs a STREAM-like triad, on this machine's CPU"
run_step "host kernel bench" 45 python3 benches/host_attention.py --quick --no-torch > "$WORK/host-kernel.md" 2>&1
status+=("host kernel bench: exit $?")
tail -12 "$WORK/host-kernel.md"
echo "== serving: continuous batching at a budget of 1/3 of the workload's KV (Llama-3-8B shapes, 8 layers, bf16)"
# Needs transformers >= 5.24 (its paged cache layout); a copy carried in .carry/transformers-site is used
# first, else the machine's own (5.17 refuses, and the step says so).
SERVE_PATH=$PYTHONPATH
[ -d .carry/transformers-site ] && SERVE_PATH=$PWD/.carry/transformers-site:$PYTHONPATH
PYTHONPATH=$SERVE_PATH run_step "serving bench" 120 python3 -m pie_rs.cli bench --serving --device cuda --llama3-8b \
    --rates 4,16 --requests 48 --out "$WORK/serving" --no-progress > "$WORK/serving.md" 2>&1
status+=("serving bench: exit $? ($(grep -c DIFFER "$WORK/serving.md") token mismatches)")
echo "== per-layer overhead on the caller's thread (CUDA, everything resident)"
run_step "overhead" 45 python3 benches/overhead.py --device cuda --rounds 9 > "$WORK/overhead.md" 2>&1
echo "== pie-rs demo (CUDA shape)"
run_step "demo" 60 python3 -m pie_rs.cli demo --out "$WORK/demo" --no-progress > "$WORK/demo.md" 2>&1
GPUS=$(nvidia-smi --list-gpus | wc -l)
if [ "$GPUS" -gt 1 ]; then
  echo "== model split across 2 GPUs by layers: an engine per device"
  run_step "multi-GPU" 120 python3 benches/gpu/multi_gpu.py "$WORK/multi_gpu.json" > "$WORK/multi-gpu.md" 2>&1
  status+=("multi-GPU: $(tail -1 "$WORK/multi-gpu.md")")
  cp "$WORK/multi-gpu.md" "$OUT/" 2>/dev/null
else
  status+=("multi-GPU: skipped ($GPUS GPU)")
fi
echo "== KV reuse: prefix store vs recomputing, N copies' device memory"
run_step "reuse bench" 60 python3 benches/reuse.py --json "$WORK/reuse.json" > "$WORK/reuse.md" 2>&1
# At most 8 files come back from $OUT: e2e.json, multi-gpu.md (several GPUs only) and these six;
# the host-attention results travel inside e2e.md.
{ echo; echo "== host attention (benches/gpu/host_attention_bench.py)"; cat "$WORK/host-attn.md"
  echo; echo "== host kernel vs triad (benches/host_attention.py --quick --no-torch)"; cat "$WORK/host-kernel.md"; } \
  >> "$WORK/e2e.md" 2>/dev/null
cp "$WORK/py-tests.log" "$WORK/copy.md" "$WORK/e2e.md" "$WORK/serving.md" "$WORK/reuse.md" "$WORK/demo.md" "$OUT/" 2>/dev/null
echo
echo "===== summary ($(date -u +%Y-%m-%d), $(head -1 "$WORK/gpu.txt"), $(tail -1 "$WORK/gpu.txt"))"
printf '%s\n' "${status[@]}"
cat "$WORK/copy.md"
grep -v "^  pie-rs\|^  DynamicCache\|^  HF off" "$WORK/e2e.md" | tail -30
grep -v "^  pie-rs\|^  DynamicCache" "$WORK/host-attn.md" | tail -10
tail -8 "$WORK/host-kernel.md"
tail -3 "$WORK/overhead.md"
tail -18 "$WORK/demo.md"
grep -v "psutil\|Logger" "$WORK/serving.md" | tail -16
tail -14 "$WORK/reuse.md"
