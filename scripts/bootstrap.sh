#!/usr/bin/env bash
# Create .venv (once) and install the project with its pinned constraints (CPU torch 2.13.0). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,dg]" 2> >(grep -v "is ignored: it is neither" >&2)
