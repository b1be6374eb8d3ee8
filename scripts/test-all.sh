#!/usr/bin/env bash
# The whole test suite: lints, Rust tests (pie-core, pie-host, pie-cuda), the Python
# tests against the newest transformers and against 5.17.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
cargo fmt --all -- --check
ruff check python tests benches
cargo clippy --release --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -q --workspace
cargo test --release -p pie-core -p pie-host -p pie-cuda
# The lock-free ring, model-checked with loom (its own target dir: other cfg).
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -q --release -p pie-core --test loom
python -m pytest -q
# transformers 5.17 (keyword past_key_values only): the identity, API and host-attention tests again.
PYTHONPATH=.cache/transformers-5.17 python -m pytest -q -m "not slow" tests/test_identity.py tests/test_api.py tests/test_host_attention_cache.py
