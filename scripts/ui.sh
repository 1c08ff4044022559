#!/usr/bin/env bash
# The Dagster UI (`dg dev`, http://localhost:3000) on the instance and settings of the demo's HOME (./data, or
# $EMBED_ASSETS_HOME): what `scripts/demo.sh` ran is there. Arguments go on to `embed-assets ui` (--home, --port, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/embed-assets ] || bash scripts/bootstrap.sh
exec .venv/bin/embed-assets ui --home "${EMBED_ASSETS_HOME:-data}" "$@"
