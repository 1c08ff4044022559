#!/usr/bin/env bash
set -euo pipefail
# System packages the tests drive (run by scripts/test.sh): Debian's chromium (the browser test) and PostgreSQL (the production-instance
# test). Installed once, as root, when missing; a machine without root must provide them.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "test_deps: installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "test_deps: ${missing[*]} not installed and not root: the browser/PostgreSQL tests will fail until they are" >&2
  fi
fi
