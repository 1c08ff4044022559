#!/usr/bin/env bash
# Set up, then run every test (the slow full-SciFact acceptance test included; -m "not slow" skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/test_deps.sh
set +e
.venv/bin/python -m pytest -rfEs --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
