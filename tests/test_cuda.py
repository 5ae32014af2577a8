"""The scan and triton backends on a CUDA device against the Rust core on the CPU, at training
sizes.

The properties of test_torch_ops.py (reference equivalence, gradcheck, half precision, non-finite
input) also run on CUDA where a GPU is present; these tests add what only a GPU can show: sizes
that training uses, TF32 matmuls switched on, torch.compile with CUDA kernels, arguments on mixed
devices, and for the triton backend its programs running at the same time (look-back across
thousands of tiles, results that do not depend on timing) and CUDA-graph capture and replay.
Skipped where torch sees no CUDA device (CI has none); the triton cases also where triton is
missing.

Tolerance: the scan's bound of test_torch_ops.py (kpo_rs.testing.tolerance with
``L + 4 C depth`` steps); the triton backend's of test_triton.py (``L`` steps, as the Rust core);
on the envelope of the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kpo_rs
from helpers import error_steps, triton_tile
from kpo_rs import backends, testing, torch_ops
from kpo_rs.backends import Rows
from kpo_rs.params import FilterParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: The device backends, each run on the same cases: every registered backend that runs on CUDA
#: (the scan, and triton where it is installed).
BACKENDS = [
    name
    for name, entry in backends.registered().items()
    if entry.choice and entry.available(torch.device("cuda"))
]
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton and CUDA")

PARAMS = [
    {},  # the authors' settings
    {"q": 1e-5, "p0": math.inf, "m0": 0.0},  # flat prior
    {"q": 1e-2, "r": 0.5, "p0": 2.0, "m0": 0.1},
]


def _assert_close(
    got: torch.Tensor, want: np.ndarray, env: np.ndarray, dtype, length: int, backend="scan"
):
    testing.assert_filter_close(
        got.detach().cpu().numpy(), want, env, dtype, error_steps(backend, length)
    )


def _batch(batch: int, length: int, dtype, holes: bool, seed: int):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 0.3, (batch, length)).astype(dtype)
    mask = None
    if holes:
        mask = rng.random((batch, length)) < 0.9
        mask[:, length // 2 :] &= np.arange(batch)[:, None] % 3 != 0  # right padding too
    return z, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("masked", ["hold", "zero"])
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_backends_match_the_rust_core(backend, dtype, holes, masked, params):
    """Forward and adjoint at 24 x 5000 (the scan's recursion goes three levels deep; the triton
    kernels' tiles span rows)."""
    z, mask = _batch(24, 5000, dtype, holes, seed=1)
    grad = np.random.default_rng(2).normal(size=z.shape).astype(dtype)
    want_y = kpo_rs.kalman_filter(z, mask, masked=masked, **params)
    want_dz, want_dm0 = kpo_rs.kalman_filter_adjoint(grad, mask, masked=masked, **params)

    tz = torch.from_numpy(z).cuda().requires_grad_(True)
    m0 = torch.tensor(params.get("m0", 0.0), dtype=torch.float64, device="cuda")
    m0.requires_grad_(True)
    tmask = None if mask is None else torch.from_numpy(mask).cuda()
    kw = {k: v for k, v in params.items() if k != "m0"}
    y = torch_ops.kalman_filter(tz, tmask, m0=m0, masked=masked, backend=backend, **kw)
    y.backward(torch.from_numpy(grad).cuda())

    dt = np.dtype(dtype)
    batch = testing.PaddedBatch(z, mask)
    env_y = testing.forward_envelope(batch, params)
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, dict(params, masked=masked))
    _assert_close(y, want_y, env_y, dt, z.shape[1], backend)
    _assert_close(tz.grad, want_dz, env_dz, dt, z.shape[1], backend)
    bound = (
        testing.tolerance(env_dm0, dt, error_steps(backend, z.shape[1])).sum()
        + 1e-12 * env_dm0.sum()
    )
    assert abs(float(m0.grad) - float(want_dm0.sum())) <= bound


@pytest.mark.parametrize("masked", ["hold", "zero"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_packed_matches_the_rust_core(backend, masked):
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 3000, 40)
    lengths[5] = 0
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.normal(0.0, 0.3, int(cu[-1])).astype(np.float32)
    mask = rng.random(values.shape) < 0.85
    grad = rng.normal(size=values.shape).astype(np.float32)
    want_y = kpo_rs.kalman_filter_packed(values, cu, mask, masked=masked, p0=math.inf)
    want_dz, _ = kpo_rs.kalman_filter_packed_adjoint(grad, cu, mask, masked=masked, p0=math.inf)

    tv = torch.from_numpy(values).cuda().requires_grad_(True)
    y = torch_ops.kalman_filter_packed(
        tv,
        torch.from_numpy(cu).cuda(),
        torch.from_numpy(mask).cuda(),
        masked=masked,
        p0=math.inf,
        backend=backend,
    )
    y.backward(torch.from_numpy(grad).cuda())
    batch = testing.PackedBatch(values, cu, mask)
    params = {"p0": math.inf, "m0": 0.0, "masked": masked}
    env_y = testing.forward_envelope(batch, params)
    env_dz, _ = testing.adjoint_envelope(batch, grad, params)
    _assert_close(y, want_y, env_y, np.dtype(np.float32), int(lengths.max()), backend)
    _assert_close(tv.grad, want_dz, env_dz, np.dtype(np.float32), int(lengths.max()), backend)


def test_tf32_matmuls_do_not_lower_precision():
    """With TF32 allowed the scan avoids matmuls (10-bit mantissas would cost ~1e-3 relative)."""
    z, mask = _batch(16, 4096, np.float32, holes=True, seed=4)
    want = kpo_rs.kalman_filter(z, mask)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        y = torch_ops.kalman_filter(
            torch.from_numpy(z).cuda(), torch.from_numpy(mask).cuda(), backend="scan"
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    env = testing.forward_envelope(testing.PaddedBatch(z, mask), {"m0": 0.0})
    _assert_close(y, want, env, np.dtype(np.float32), z.shape[1])


@pytest.mark.parametrize("length", [32_768, 262_144])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_float32_accuracy_on_long_rows(backend, length):
    """Same bound as the CPU test of the scan on long rows: 1e-5 of the largest |z|."""
    rng = np.random.default_rng(5)
    z64 = rng.normal(0.0, 0.5, (2, length)) + 0.01 * np.sin(np.arange(length) / 500)
    z32 = z64.astype(np.float32)
    for params in ({}, {"p0": math.inf, "q": 1e-5}, {"q": math.inf}):
        want = kpo_rs.kalman_filter(z32.astype(np.float64), **params)
        got = torch_ops.kalman_filter(torch.from_numpy(z32).cuda(), backend=backend, **params)
        got = got.cpu().numpy()
        err = float(np.max(np.abs(got - want)))
        assert err <= 1e-5 * float(np.max(np.abs(z64))), (params, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_on_cuda_matches_eager(backend):
    def loss_fn(logp, old_logp, adv, mask, m0):
        x = torch_ops.kalman_filter(
            logp - old_logp, mask, q=1e-3, p0=math.inf, m0=m0, backend=backend
        )
        return -(adv.unsqueeze(-1) * torch.exp(x) * mask).sum() / mask.sum()

    gen = torch.Generator().manual_seed(6)
    logp = (torch.randn(8, 700, generator=gen, dtype=torch.float64) * 0.1).cuda()
    old = logp + (torch.randn(8, 700, generator=gen, dtype=torch.float64) * 0.05).cuda()
    adv = torch.randn(8, generator=gen, dtype=torch.float64).cuda()
    mask = (torch.rand(8, 700, generator=gen) < 0.9).cuda()
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        lp = logp.clone().requires_grad_(True)
        m0 = torch.zeros((), dtype=torch.float64, device="cuda", requires_grad=True)
        loss = fn(lp, old, adv, mask, m0)
        loss.backward()
        results.append((loss.detach(), lp.grad, m0.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


def test_cu_seqlens_may_stay_on_the_cpu():
    values = torch.randn(300, device="cuda")
    cu_cpu = torch.tensor([0, 100, 300])
    a = torch_ops.kalman_filter_packed(values, cu_cpu)
    b = torch_ops.kalman_filter_packed(values, cu_cpu.cuda())
    assert a.device == values.device
    assert torch.equal(a, b)


def test_mask_on_another_device_is_refused():
    with pytest.raises(ValueError, match="mask is on cpu, z on cuda"):
        z = torch.zeros(2, 3, device="cuda")
        torch_ops.kalman_filter(z, torch.ones(2, 3, dtype=torch.bool))


def test_rust_backend_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="needs CPU tensors"):
        torch_ops.kalman_filter(torch.zeros(2, 3, device="cuda"), backend="rust")


def test_losses_on_cuda_match_the_cpu():
    """The KPO-clipped loss and its gradient: CUDA (scan) against CPU (Rust core), float64."""
    from kpo_rs import losses

    gen = torch.Generator().manual_seed(8)
    old = -torch.rand(6, 500, generator=gen, dtype=torch.float64) * 3
    logp = old + torch.randn(6, 500, generator=gen, dtype=torch.float64) * 0.05
    adv = torch.randn(6, 1, generator=gen, dtype=torch.float64).expand(6, 500)
    mask = torch.rand(6, 500, generator=gen) < 0.9
    out = []
    for device in ("cpu", "cuda"):
        lp = logp.to(device).clone().requires_grad_(True)
        loss = losses.kpo_clipped_loss(old.to(device), lp, adv.to(device), mask.to(device))[0]
        loss.backward()
        out.append((loss.detach().cpu(), lp.grad.cpu()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------
# The triton backend: concurrency, determinism, CUDA graphs


def _rust_filter(z, cu, mask, params):
    if cu is None:
        return kpo_rs.kalman_filter(z, mask, params=params)
    return kpo_rs.kalman_filter_packed(z, cu, mask, params=params)


def _rust_adjoint(g, cu, mask, params):
    if cu is None:
        return kpo_rs.kalman_filter_adjoint(g, mask, params=params)
    return kpo_rs.kalman_filter_packed_adjoint(g, cu, mask, params=params)


@needs_triton
@pytest.mark.parametrize("tile", [256, None])
@pytest.mark.parametrize("masked", ["hold", "zero"])
def test_triton_long_rows_many_tiles_same_result_every_run(tile, masked):
    """One packed row of a million tokens and 16 x 131072 padded rows, cut into thousands of
    tiles whose programs run at once and wait for each other: the Rust core's result within the
    long-row bound (1e-5 of the largest |z|; for the adjoint, of the adjoint of |grad|), and
    bitwise the same result on every run (the look-back applies the tiles' maps in time order
    whatever the timing)."""
    from kpo_rs.backends import triton as tb

    rng = np.random.default_rng(9)
    params = FilterParams(q=1e-5, p0=math.inf, masked=masked)
    with triton_tile(tile):
        for shape in [(1 << 20,), (16, 131072)]:
            z = (rng.normal(0.0, 0.5, shape) + 0.1).astype(np.float32)
            g = rng.normal(0.0, 1.0, shape).astype(np.float32)
            mask = rng.random(shape) < 0.9
            cu = np.array([0, shape[0]]) if len(shape) == 1 else None
            tz, tg, tmask = (torch.from_numpy(a).cuda() for a in (z, g, mask))
            tcu = None if cu is None else torch.from_numpy(cu).cuda()
            runs = [tb.forward(Rows(tz, tcu, tmask, params), 0.0, check="sync") for _ in range(3)]
            grads = [tb.adjoint(Rows(tg, tcu, tmask, params), check="sync") for _ in range(3)]
            for y in runs[1:]:
                assert torch.equal(y, runs[0])
            for dz, dm0 in grads[1:]:
                assert torch.equal(dz, grads[0][0]) and torch.equal(dm0, grads[0][1])
            want = _rust_filter(z, cu, mask, params)
            err = float(np.max(np.abs(runs[0].cpu().numpy() - want)))
            assert err <= 1e-5 * float(np.max(np.abs(z))), (shape, err)
            want_dz, want_dm0 = _rust_adjoint(g, cu, mask, params)
            read = np.abs(g) if masked == "hold" else np.where(mask, np.abs(g), 0.0)
            env_dz, env_dm0 = _rust_adjoint(read.astype(np.float32), cu, mask, params)
            got_dz, got_dm0 = (t.cpu().numpy() for t in grads[0])
            assert float(np.max(np.abs(got_dz - want_dz))) <= 1e-5 * float(np.max(env_dz))
            assert np.all(np.abs(got_dm0 - want_dm0) <= 1e-5 * env_dm0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", ["hold", "zero"])
def test_triton_per_row_path_gives_the_look_back_bits(dtype, masked, monkeypatch):
    """The one-program-per-row kernels (``PER_ROW=True``) against the look-back kernels on the
    device: 512 x 3000 padded rows (more rows than multiprocessors, rows not a multiple of the
    tile) and uneven packed rows with holes, forward and adjoint bitwise equal (compiled with
    fused multiply-adds, both paths the same expressions)."""
    from kpo_rs.backends import triton as tb

    gen = torch.Generator().manual_seed(24)
    params = FilterParams(q=1e-3, r=0.5, p0=2.0, masked=masked)
    lengths = torch.randint(0, 5000, (300,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    for shape, tcu in [((512, 3000), None), ((int(cu[-1]),), cu)]:
        z = torch.randn(shape, generator=gen, dtype=dtype).cuda()
        g = torch.randn(shape, generator=gen, dtype=dtype).cuda()
        mask = (torch.rand(shape, generator=gen) < 0.8).cuda()
        got = {}
        for per_row in (False, True):
            monkeypatch.setattr(tb, "PER_ROW", per_row)
            got[per_row] = [
                tb.forward(Rows(z, tcu, mask, params), 0.25, check="sync"),
                *tb.adjoint(Rows(g, tcu, mask, params), check="sync"),
            ]
        for want, have in zip(got[False], got[True], strict=True):
            assert torch.equal(want, have), shape


@needs_triton
def test_triton_op_captured_in_a_cuda_graph_and_replayed():
    """The op's forward and backward captured once and replayed on new inputs: the eager results
    each time; a non-finite value read during a replay is reported by raise_if_non_finite."""
    from kpo_rs.backends import triton as tb

    gen = torch.Generator(device="cuda").manual_seed(10)
    z = torch.randn(8, 3000, device="cuda", generator=gen).requires_grad_(True)
    g = torch.randn(8, 3000, device="cuda", generator=gen)
    mask = torch.rand(8, 3000, device="cuda", generator=gen) < 0.9
    mask[3, 100] = True
    kw = {"q": 1e-3, "p0": math.inf, "backend": "triton"}

    def step():
        y = torch_ops.kalman_filter(z, mask, **kw)
        y.backward(g)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, builds the gain table
        for _ in range(2):
            z.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    z.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for seed in range(3):
        with torch.no_grad():
            z.copy_(torch.randn(z.shape, device="cuda", generator=gen.manual_seed(20 + seed)))
            g.copy_(torch.randn(g.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        zz = z.detach().clone().requires_grad_(True)
        want = torch_ops.kalman_filter(zz, mask, **kw)
        want.backward(g)
        assert torch.equal(y, want.detach())
        assert torch.equal(z.grad, zz.grad)
    tb.raise_if_non_finite()
    with torch.no_grad():
        z[3, 100] = math.nan
    graph.replay()
    with pytest.raises(ValueError, match="values: non-finite value at row 3, position 100"):
        tb.raise_if_non_finite()


def test_auto_is_the_scan_until_triton_is_validated_on_hardware():
    """``backend="auto"`` on CUDA is the torch scan until the triton kernels' GPU evidence is
    committed (docs/gpu.md, ``kpo_rs.backends.triton.TRITON_VALIDATED``)."""
    from kpo_rs.backends import triton as tb

    want = "triton" if tb.TRITON_VALIDATED else "scan"
    assert backends.resolve("auto", torch.device("cuda")) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_log_prob_raises_the_named_error_from_the_loss_on_cuda(backend):
    """On the device the KPO loss raises the CPU path's one-line error (the scan at once; triton
    at once with the losses' default ``check="sync"``, at ``losses.check_finite`` with
    ``"deferred"``)."""
    from kpo_rs import losses

    old = torch.zeros(3, 300, device="cuda")
    logp = torch.full((3, 300), -0.5, device="cuda")
    adv, mask = (
        torch.ones(3, 300, device="cuda"),
        torch.ones(3, 300, dtype=torch.bool, device="cuda"),
    )
    logp[1, 250] = math.nan
    message = r"^log_prob: non-finite value at row 1, position 250$"
    with pytest.raises(ValueError, match=message):
        losses.kpo_clipped_loss(old, logp, adv, mask, backend=backend)
    if backend != "triton":  # the scan checks every call at once, whatever check says
        with pytest.raises(ValueError, match=message):
            losses.kpo_clipped_loss(old, logp, adv, mask, backend=backend, check="deferred")
        return
    losses.kpo_clipped_loss(old, logp, adv, mask, backend=backend, check="deferred")
    with pytest.raises(ValueError, match=message):
        losses.check_finite(old, logp)
