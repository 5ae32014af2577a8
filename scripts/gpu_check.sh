#!/usr/bin/env bash
# The one GPU check of the Triton backend, for a machine with an NVIDIA GPU that has python3 with
# torch, triton, numpy, pytest and hypothesis but may reach no package index (the `device` runner
# of this workplace, or a user's own box): installs the kpo-rs wheel found in $WHEELS without
# dependencies, then runs `kpo doctor --json`, the CUDA tests (tests/test_cuda.py and the gpu
# tier of tests/test_torch_ops.py), and benches/gpu.py, writing every result under $OUT.
#
#   bash scripts/build_wheels.sh                      # here: the abi3 wheel, into dist/
#   mkdir -p .gpu-wheel && cp dist/kpo_rs-*.whl .gpu-wheel/   # an ignored folder to carry
#   WHEELS=.gpu-wheel OUT=/tmp/gpu bash scripts/gpu_check.sh  # there
#
# Each step's exit status is recorded in $OUT/status.txt and the script goes on, so one failing
# step does not cost the others' results; it exits 1 if any step failed. Budget: about 6 minutes
# on an H100/H200 (the tests dominate; set GPU_CHECK_SHAPES to shorten the benchmark).
set -uo pipefail

wheels=${WHEELS:?set WHEELS to the folder holding the kpo_rs wheel}
out=${OUT:?set OUT to the folder for the results}
python=${PYTHON:-python3}
site=${KPO_SITE:-/tmp/kpo-site}
mkdir -p "$out" "$site"
: >"$out/status.txt"
failed=0

step() {
    local name=$1
    shift
    local start=$SECONDS
    "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    printf '%-12s rc %d  %4d s\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$out/status.txt"
    [ "$rc" -eq 0 ] || failed=1
}

step install "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target "$site" "$wheels"/kpo_rs-*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step machine sh -c "nvidia-smi; $python -c 'import torch, triton, kpo_rs; print(torch.__version__, triton.__version__, kpo_rs.__version__, torch.cuda.get_device_name())'"
step doctor "$python" -m kpo_rs.cli doctor --json
step cuda_tests "$python" -m pytest -q -p no:randomly -p no:cacheprovider -m "" \
    tests/test_cuda.py tests/test_torch_ops.py -k "cuda or triton or gpu"
step bench "$python" benches/gpu.py --json "$out/gpu.json" \
    ${GPU_CHECK_SHAPES:+--shapes "$GPU_CHECK_SHAPES"}
exit "$failed"
