#!/usr/bin/env bash
# The main job on a fresh machine: set up (once) and run `pie-rs demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
pie-rs demo "$@"
