#!/usr/bin/env bash
# The tests: pytest (unit, property and doctests), then the Sphinx docs build with warnings as
# errors, which executes every notebook. Creates .venv and installs what it needs.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -x -k naive
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

total=$SECONDS
stage_start=$SECONDS
stage_done() { echo "== $1: $((SECONDS - stage_start)) s"; echo; stage_start=$SECONDS; }

ensure_venv "dev,docs"
use_triton_interpreter_without_gpu
stage_done "set-up"

# 1. pytest. Its exit code is kept as is: 5 (no tests collected) fails like any other non-zero code.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
python -m pytest "$@" 2>&1 | tee "$log"
pytest_rc=${PIPESTATUS[0]}
set -e
echo
echo "pytest summary: $(grep -E '^=+ .* in [0-9.]+s.* =+$' "$log" | tail -n 1 | sed -E 's/^=+ (.*) =+$/\1/' || true)"
if [ "$pytest_rc" -ne 0 ]; then
    if [ "$pytest_rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure"; fi
    echo "FAILED: pytest exit code $pytest_rc (after $((SECONDS - total)) s)"
    exit "$pytest_rc"
fi
stage_done "pytest"

# 2. The docs, from a fresh environment (-E) so that every page is re-read, every notebook
#    re-executed and every warning re-raised; -W -n: any warning or broken reference fails.
python -m sphinx -E -W --keep-going -n -q -b html docs docs/_build/html
stage_done "docs build (docs/_build/html/index.html)"

echo "all passed in $((SECONDS - total)) s"
