#!/usr/bin/env bash
# Builds the release artifacts into dist/ (or $KPO_DIST): the abi3 wheel for this machine's Linux
# architecture (x86_64 or aarch64), tagged manylinux2014 (glibc 2.17: RHEL/Rocky 8, Ubuntu 20.04
# and older clusters install it), and the sdist; then confirms the wheel's platform tag with
# auditwheel.
#
# The wheel is linked with zig (`ziglang` from PyPI, in requirements/dev.lock) against glibc 2.17's
# symbols, so the build machine's newer glibc does not leak into the tag.
#
# Needs cargo (a Rust toolchain), python3 (3.9+) and three Python tools: maturin, ziglang and
# auditwheel. They are taken from $KPO_VENV (default .venv) when it has all three (as
# scripts/setup.sh leaves it); otherwise from a small virtual environment of their own
# ($KPO_BUILD_VENV, default target/wheel-tools), which is created on first use and given the
# versions requirements/dev.lock pins (pip, from PyPI: about 60 MB, mostly zig).
#
# Options (environment): KPO_DIST (output folder, default dist/; earlier kpo_rs wheels and sdists
# there are replaced), KPO_VENV, KPO_BUILD_VENV, PYTHON (the python3 that creates the tools'
# environment), CARGO_TARGET_DIR (as cargo). The wheel is built once, in release mode (about 40 s
# of CPU time from a clean target folder, measured on a 2-core x86_64 machine).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dist=${KPO_DIST:-$root/dist}
cd "$root"

command -v cargo >/dev/null || { echo "build_wheels: cargo not found; install Rust (https://rustup.rs)" >&2; exit 2; }

# Whether the virtual environment $1 has the three tools.
has_tools() {
    [ -x "$1/bin/maturin" ] && [ -x "$1/bin/auditwheel" ] \
        && "$1/bin/python" -m ziglang version >/dev/null 2>&1
}

venv=${KPO_VENV:-$root/.venv}
if ! has_tools "$venv"; then
    venv=${KPO_BUILD_VENV:-$root/target/wheel-tools}
    if ! has_tools "$venv"; then
        # The versions the lock pins (the names alone where the lock is absent, as in an sdist).
        pins=$(grep -E '^(maturin|ziglang|auditwheel)==' "$root/requirements/dev.lock" 2>/dev/null) \
            || pins="maturin>=1.7,<2 ziglang auditwheel"
        echo "build_wheels: installing $(echo $pins) into $venv" >&2
        [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
        # shellcheck disable=SC2086  # one argument per requirement
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins
        has_tools "$venv" || { echo "build_wheels: maturin, ziglang or auditwheel is still missing in $venv" >&2; exit 2; }
    fi
fi

arch=$(uname -m)
case "$arch" in
    x86_64|aarch64) ;;
    *) echo "build_wheels: no manylinux2014 wheel is built for $arch (x86_64 and aarch64 are)" >&2; exit 2 ;;
esac

mkdir -p "$dist"
# maturin runs `python3 -m ziglang` when no `zig` is on PATH: make that the venv's python.
export PATH="$venv/bin:$PATH"
rm -f "$dist"/kpo_rs-*.whl "$dist"/kpo_rs-*.tar.gz

"$venv/bin/maturin" build --release --zig --compatibility manylinux2014 \
    --target "$arch-unknown-linux-gnu" --out "$dist"
"$venv/bin/maturin" sdist --out "$dist"

wheel=$(ls "$dist"/kpo_rs-*.whl)
case "$(basename "$wheel")" in
    *-cp39-abi3-*manylinux2014_"$arch"*.whl) ;;
    *) echo "build_wheels: expected an abi3 manylinux2014 $arch wheel, got $(basename "$wheel")" >&2; exit 1 ;;
esac
# auditwheel reads the symbol versions the extension needs and names the oldest policy it meets.
report=$("$venv/bin/auditwheel" show "$wheel")
echo "$report"
grep -q "\"manylinux_2_17_$arch\"" <<<"$report" \
    || { echo "build_wheels: auditwheel does not confirm manylinux_2_17 (manylinux2014)" >&2; exit 1; }
echo "build_wheels: $(cd "$dist" && ls kpo_rs-*)"
