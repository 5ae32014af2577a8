#!/usr/bin/env bash
# Sets up the development environment: a virtual environment (.venv, or $KPO_VENV) holding the
# locked dependencies of requirements/dev.lock, and the extension module built in release mode.
# Safe to run again: what is already installed is kept.
#
# Needs: python3 (3.9+) with venv, and a Rust toolchain (cargo). Everything else comes from PyPI.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KPO_VENV:-$root/.venv}
python=${PYTHON:-python3}
uv_version=0.13.9

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    "$python" -m venv "$venv"
fi
if [ "$("$venv/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$uv_version" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
fi
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" -r "$root/requirements/dev.lock"
# Byte-compile the dependencies once per lock file: where PYTHONDONTWRITEBYTECODE is set, every
# import would otherwise compile its sources again (seconds for pandas, torch, transformers).
marker="$venv/.compiled-$(sha256sum "$root/requirements/dev.lock" | cut -c1-16)"
if [ ! -e "$marker" ]; then
    echo "setup: byte-compiling the dependencies (once)"
    "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
    touch "$marker"
fi

echo "setup: building the extension (release)"
cd "$root"
VIRTUAL_ENV="$venv" "$venv/bin/maturin" develop --release --uv --quiet
"$venv/bin/python" -c "import kpo_rs; print('setup: kpo_rs', kpo_rs.__version__, 'ready in', '$venv')"
