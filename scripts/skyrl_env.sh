#!/usr/bin/env bash
# Builds the SkyRL test environment, .venv-skyrl (or $KPO_SKYRL_VENV), in which
# tests/test_skyrl_real.py runs the SkyRL plug-in inside SkyRL 0.3.0 (docs/integrations/skyrl.md).
#
#   bash scripts/skyrl_env.sh          # create or update the environment (safe to run again)
#   bash scripts/skyrl_env.sh --lock   # regenerate requirements/skyrl.lock from requirements/skyrl.in
#
# Its own environment because SkyRL's pins (transformers<=5.8, peft==0.18.1, ray==2.56.0) clash
# with the dev lock's TRL and verl. skyrl==0.3.0 and skyrl-gym==0.4.0 are installed without their
# dependencies (the full set brings vllm, flash-attn, ...); requirements/skyrl.lock holds what
# SkyRL's policy-loss module imports, compiled against the dev lock so that uv's cache serves
# nearly all of it. kpo-rs is the working tree itself (a .pth file naming python/), with the
# extension that scripts/setup.sh builds there. Needs: scripts/setup.sh run first (the dev
# environment's uv, Python >= 3.11 and the built extension). Exits non-zero, saying why, when
# the environment cannot be built or SkyRL's policy-loss module does not import in it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev_venv=${KPO_VENV:-$root/.venv}
venv=${KPO_SKYRL_VENV:-$root/.venv-skyrl}
python=${KPO_SKYRL_PYTHON:-$dev_venv/bin/python}
uv=$dev_venv/bin/uv
skyrl_pins=(skyrl==0.3.0 skyrl-gym==0.4.0)

fail() { echo "skyrl_env: $*" >&2; exit 1; }

[ -x "$uv" ] || fail "$uv not found; run scripts/setup.sh first"
cd "$root"

if [ "${1:-}" = "--lock" ]; then
    # The dev lock as constraints (less its ray: SkyRL pins its own), so that both environments
    # share versions, and uv's cache, wherever SkyRL allows.
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    grep -v '^ray==' requirements/dev.lock >"$constraints"
    "$uv" pip compile --quiet requirements/skyrl.in -c "$constraints" --python-version 3.11 \
        --python-platform x86_64-unknown-linux-gnu --no-annotate \
        --custom-compile-command "bash scripts/skyrl_env.sh --lock" -o requirements/skyrl.lock
    exit 0
fi
[ $# -eq 0 ] || fail "unknown argument $1 (the only option is --lock)"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$python is older than 3.11 (SkyRL 0.3.0 needs >= 3.11); set KPO_SKYRL_PYTHON"
ls python/kpo_rs/_core*.so >/dev/null 2>&1 \
    || fail "python/kpo_rs has no built extension; run scripts/setup.sh first"

if [ ! -x "$venv/bin/python" ]; then
    echo "skyrl_env: creating $venv"
    "$uv" venv --quiet --python "$python" "$venv"
fi
"$uv" pip install --quiet --python "$venv/bin/python" -r requirements/skyrl.lock
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps "${skyrl_pins[@]}"

# kpo-rs from the working tree, as the dev environment's editable install has it.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(cat "$site/kpo_rs.pth" 2>/dev/null)" != "$root/python" ]; then
    printf '%s\n' "$root/python" >"$site/kpo_rs.pth.tmp"
    mv "$site/kpo_rs.pth.tmp" "$site/kpo_rs.pth"
fi

# Byte-compile once per lock (where PYTHONDONTWRITEBYTECODE is set, torch's import would compile
# its sources every time), as scripts/setup.sh does for the dev environment.
marker="$venv/.compiled-$(sha256sum requirements/skyrl.lock | cut -c1-16)"
if [ ! -e "$marker" ]; then
    echo "skyrl_env: byte-compiling the dependencies (once)"
    "$venv/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
    touch "$marker"
fi

# SkyRL's skyrl.tinker.types (imported on the way to ppo_utils) declares typing.TypedDict
# models, which pydantic refuses below Python 3.12: alias it for this check, as the tests do.
"$venv/bin/python" - <<'EOF' || fail "SkyRL's policy-loss module does not import in the environment (above)"
import importlib.metadata as md
import sys
import typing

import typing_extensions

if sys.version_info < (3, 12):
    typing.TypedDict = typing_extensions.TypedDict  # type: ignore[misc]
from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry  # noqa: E402

import kpo_rs.integrations.skyrl  # noqa: E402,F401

names = ", ".join(sorted(PolicyLossRegistry.list_available()))
print(f"skyrl_env: skyrl {md.version('skyrl')}, torch {md.version('torch')}, "
      f"ray {md.version('ray')}; SkyRL's policy losses: {names}")
EOF
echo "skyrl_env: ready in $venv"
