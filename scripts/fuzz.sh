#!/usr/bin/env bash
# Fuzzes the Rust kernels (packed and padded, forward and adjoint) with arbitrary layouts for a
# fixed time budget: bash scripts/fuzz.sh [SECONDS] (default 120). Needs cargo-fuzz
# (cargo install cargo-fuzz) and a nightly toolchain, or stable with RUSTC_BOOTSTRAP=1.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-120}
cd "$root"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q nightly; then
    toolchain=(+nightly)
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
cargo "${toolchain[@]}" fuzz run kernels -- -max_total_time="$seconds" -max_len=1024 2>&1 | tail -n 25
