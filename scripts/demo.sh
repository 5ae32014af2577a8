#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: a short tour of the filter on synthetic rollouts.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
exec "${KPO_VENV:-$root/.venv}/bin/python" "$root/examples/quickstart.py" "$@"
