#!/usr/bin/env bash
# The demo: every KDA layer present runs one random problem and is checked against the
# naive float64 reference (python -m kda_explained). Creates .venv and installs what it needs.
# Extra arguments go to the demo, e.g. bash scripts/demo.sh --quick --seed 1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

start=$SECONDS
ensure_venv torch
echo "set-up: $((SECONDS - start)) s"
echo

python -m kda_explained "$@"
