#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: `kpo demo`, a small RL run on CPU that trains
# the same tiny policy with each policy loss (GRPO, GSPO, GMPO, KPO, KPO-clipped) and compares them.
# Arguments are passed to `kpo demo` (see `kpo demo --help`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
exec "${KPO_VENV:-$root/.venv}/bin/kpo" demo "$@"
