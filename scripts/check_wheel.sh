#!/usr/bin/env bash
# Smoke-tests the release wheel: builds it and the sdist with scripts/build_wheels.sh (into a
# temporary folder, or $KPO_DIST; the abi3 manylinux2014 wheel of this machine's architecture, its
# tag confirmed by auditwheel), checks the
# sdist's contents, installs the wheel into a fresh virtual environment that has only numpy, and
# runs a smoke test there (outside the source tree, so the installed package is what gets
# imported), metadata included.
#
# Usage: scripts/check_wheel.sh [WHEEL]   (with WHEEL, that wheel is tested and nothing is built)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KPO_VENV:-$root/.venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dist=${KPO_DIST:-$work/dist}
cd "$root"

if [ $# -ge 1 ]; then
    wheel=$(realpath "$1")
    [ -f "$wheel" ] || { echo "check_wheel: no such wheel: $1" >&2; exit 2; }
else
    KPO_DIST=$dist bash scripts/build_wheels.sh
    wheel=$(ls "$dist"/kpo_rs-*.whl)
    sdist=$(ls "$dist"/kpo_rs-*.tar.gz)
    listing=$(tar -tzf "$sdist")
    for f in pyproject.toml Cargo.toml Cargo.lock rust/filter.rs rust/python.rs python/kpo_rs/__init__.py; do
        grep -qx "[^/]*/$f" <<<"$listing" || { echo "check_wheel: sdist lacks $f" >&2; exit 1; }
    done
    echo "check_wheel: the sdist $(basename "$sdist") holds the sources"
fi
case "$(basename "$wheel")" in
    *-cp39-abi3-*manylinux*_x86_64*.whl|*-cp39-abi3-*manylinux*_aarch64*.whl) ;;
    *) echo "check_wheel: expected an abi3 manylinux wheel, got $(basename "$wheel")" >&2; exit 1 ;;
esac

python3 -m venv "$work/venv"
"$venv/bin/uv" pip install --quiet --python "$work/venv/bin/python" numpy "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys

import numpy as np

import kpo_rs

assert "site-packages" in kpo_rs.__file__, kpo_rs.__file__
meta = md.metadata("kpo-rs")
for key in ("License", "Summary", "Requires-Python"):
    assert meta.get(key), f"metadata lacks {key}"
assert any("Typing :: Typed" in c for c in meta.get_all("Classifier")), "classifiers"
extras = set(meta.get_all("Provides-Extra"))
assert {"torch", "verl", "trl", "testing", "demo", "arrow"} <= extras, extras
assert any(u.startswith("Source") for u in meta.get_all("Project-URL")), "project URLs"
assert md.entry_points(group="console_scripts", name="kpo"), "the kpo command"

z = np.random.default_rng(0).normal(size=(3, 100)).astype(np.float32)
x = kpo_rs.kalman_filter(z, z > -1, p0=float("inf"))
dz, dm0 = kpo_rs.kalman_filter_adjoint(z)
packed = kpo_rs.kalman_filter_packed(z.ravel(), np.array([0, 100, 300]))
assert x.dtype == np.float32 and np.isfinite(x).all() and dz.shape == z.shape and dm0.shape == (3,)
assert packed.shape == (300,)
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("torch should not be installed in this environment")
# The plug-ins say which extra to install when their stack is missing.
import importlib

for module, extra in (("verl", "verl"), ("trl", "trl")):
    try:
        importlib.import_module(f"kpo_rs.integrations.{module}")
    except ImportError as exc:
        assert f"kpo-rs[{extra}]" in str(exc), exc
    else:
        sys.exit(f"kpo_rs.integrations.{module} imported without {module}")
print(f"check_wheel: kpo_rs {kpo_rs.__version__} from the wheel works with numpy {np.__version__} alone")
PY
