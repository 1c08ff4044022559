#!/usr/bin/env bash
# Set up, then materialize the whole asset graph on the bundled SciFact sample (or pass your own --items ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/embed-assets run --home "${EMBED_ASSETS_HOME:-data}" "$@"
