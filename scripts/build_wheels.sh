#!/usr/bin/env bash
# Builds the release artifacts into dist/ (or $KPO_DIST): the abi3 wheel for this machine's Linux
# architecture (x86_64 or aarch64), tagged manylinux2014 (glibc 2.17: RHEL/Rocky 8, Ubuntu 20.04
# and older clusters install it), and the sdist; then confirms the wheel's platform tag with
# auditwheel.
#
# The wheel is linked with zig (`ziglang` from PyPI, in requirements/dev.lock) against glibc 2.17's
# symbols, so the build machine's newer glibc does not leak into the tag. Run scripts/setup.sh
# first (or have maturin, ziglang and auditwheel in $KPO_VENV).
#
# Options (environment): KPO_DIST (output folder, default dist/; earlier kpo_rs wheels and sdists
# there are replaced), CARGO_TARGET_DIR (as cargo). The wheel is built once, in release mode
# (about 40 s of CPU time from a clean target folder, measured on a 2-core x86_64 machine).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KPO_VENV:-$root/.venv}
dist=${KPO_DIST:-$root/dist}
cd "$root"

for tool in maturin auditwheel; do
    [ -x "$venv/bin/$tool" ] || { echo "build_wheels: $venv/bin/$tool not found; run scripts/setup.sh" >&2; exit 2; }
done
"$venv/bin/python" -m ziglang version >/dev/null 2>&1 \
    || { echo "build_wheels: ziglang is not installed in $venv; run scripts/setup.sh" >&2; exit 2; }

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
