#!/usr/bin/env bash
# Set up and run the main job: compile the default model for this CPU, compare with FP32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ibert-tvm demo "$@"
