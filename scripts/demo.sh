#!/usr/bin/env bash
# Set up, then materialize the whole asset graph on the bundled SciFact sample (or pass your own --items ...).
# Its runs are recorded in HOME's Dagster instance (data/dagster) and its settings in data/settings.json: what
# `bash scripts/ui.sh` shows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/embed-assets run --home "${EMBED_ASSETS_HOME:-data}" "$@"
