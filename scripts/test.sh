#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: formatting and lints (rustfmt, clippy,
# ruff), types (mypy over the package, mypy.stubtest of _core.pyi), the Rust unit tests, the wheel
# built and installed into a bare environment, the fast tier on that wheel without the optional
# stacks (scripts/core_env_tests.sh: their tests must skip there), the SkyRL plug-in inside SkyRL 0.3.0 in its own
# environment (scripts/skyrl_env.sh), and the Python tests of every tier (pytest -m "": fast, slow, integration; gpu tests skip without a
# device) with hypothesis's "ci" profile (200 examples per property) when CI is set, "dev" (50)
# otherwise. The quick loop is a plain `pytest` (the fast tier): see tests/README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KPO_VENV:-$root/.venv}
cd "$root"

bash scripts/setup.sh

step() { printf '\n== %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check
step "clippy (core, tests and bindings)"
cargo clippy --all-targets --quiet -- -D warnings
cargo clippy --all-targets --features python --quiet -- -D warnings
step "ruff"
"$venv/bin/ruff" check python tests benches examples
"$venv/bin/ruff" format --check python tests benches examples
step "types (mypy over the package, mypy.stubtest of the extension's _core.pyi)"
"$venv/bin/mypy"
"$venv/bin/python" -m mypy.stubtest kpo_rs._core
step "cargo test"
cargo test --release --quiet
step "wheel (abi3, manylinux2014, built once with zig) and sdist"
wheels=$(mktemp -d)
KPO_DIST=$wheels bash scripts/check_wheel.sh
step "the wheel without the optional stacks: numpy, torch, hypothesis and pytest alone"
bash scripts/core_env_tests.sh "$wheels"/kpo_rs-*.whl
rm -rf "$wheels"
step "smoke sweep: two named variants of one loss on a correlated engine (no Ray)"
smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
"$venv/bin/kpo" sweep --variant a=kpo_clipped:filter=window:8,band=rescaled \
    --variant b=kpo_clipped:filter=window:8,band=rescaled,space=ratio \
    --mismatch logit-noise-ar1:0.25:0.9 --lr 1e-2 --response-len 16 --seeds 1 --steps 3 \
    --workers 1 --out "$smoke/sweep" 2>"$smoke/log" || { cat "$smoke/log"; exit 1; }
grep -q "2 of 2 planned runs finished" "$smoke/sweep/report.md"
grep -q "| regime | seeds | a | b |" "$smoke/sweep/report.md"
grep -q "plan: 2 runs" "$smoke/log"
step "SkyRL 0.3.0: the plug-in inside SkyRL, in its own environment (scripts/skyrl_env.sh)"
bash scripts/skyrl_env.sh
"${KPO_SKYRL_VENV:-$root/.venv-skyrl}/bin/python" -m pytest tests/test_skyrl_real.py -m "" -q
step "pytest"
if [ -n "${CI:-}" ]; then
    export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
else
    export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-dev}
fi
"$venv/bin/python" -m pytest -m "" "$@"
