#!/usr/bin/env bash
# Regenerates requirements/dev.lock from requirements/dev.in (Linux x86_64, CPython 3.11).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KPO_VENV:-$root/.venv}
cd "$root"
"$venv/bin/uv" pip compile requirements/dev.in --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu -o requirements/dev.lock
