"""The filter as a differentiable torch op.

``kalman_filter`` (padded ``[batch, time]``) and ``kalman_filter_packed`` (``[total]`` with
``cu_seqlens``) are registered with ``torch.library`` as custom ops (``kpo_rs::kalman_filter`` and
friends) with fake-tensor kernels and autograd formulas, so ``torch.compile(fullgraph=True)`` traces
them without graph breaks; in eager mode the same implementations run through a
``torch.autograd.Function``, which skips the dispatcher's per-call cost. The backward pass is the
filter's exact adjoint.

Backends
    ``"rust"``: the Rust core (CPU tensors; zero-copy when contiguous).
    ``"scan"``: a chunked parallel scan written in torch (``kpo_rs._scan``); any device.
    ``"reference"``: the plain loop of :mod:`kpo_rs.reference` (slow; for tests).
    ``"auto"`` (default): ``"rust"`` on CPU, ``"scan"`` elsewhere.

Dtypes: float32 and float64 are computed natively; float16 and bfloat16 in float32, returned (and
differentiated) in their own dtype. Parameters and masks are as in :mod:`kpo_rs`. ``m0`` may be a
float or a scalar tensor; when it is a tensor that requires grad it receives its gradient.

Requires torch (``pip install torch``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("kpo_rs.torch_ops needs PyTorch: pip install torch") from exc

from . import DEFAULT_M0, DEFAULT_P0, DEFAULT_Q, DEFAULT_R, _check_masked, _core, _params, _scan
from . import reference as _reference

__all__ = ["BACKENDS", "kalman_filter", "kalman_filter_packed"]

BACKENDS = ("auto", "rust", "scan", "reference")
_NATIVE = (torch.float32, torch.float64)
_WIDENED = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Argument checks (shared by both layouts)


def _check_values(name: str, t: Any, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in _NATIVE + _WIDENED:
        raise TypeError(
            f"{name} must have dtype float32, float64, float16 or bfloat16, got {t.dtype}"
        )


def _check_mask(mask: Any, values: torch.Tensor, values_name: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} differs from {values_name} shape {tuple(values.shape)}"
        )
    if mask.device != values.device:
        raise ValueError(f"mask is on {mask.device}, {values_name} on {values.device}")


def _check_m0(m0: Any) -> float | torch.Tensor:
    """``m0`` as a float, or as a 0-d floating-point tensor when a tensor is given."""
    if isinstance(m0, torch.Tensor):
        if m0.numel() != 1:
            raise ValueError(f"m0 must be a scalar, got a tensor of shape {tuple(m0.shape)}")
        if not m0.is_floating_point():
            raise TypeError(f"m0 must be a floating-point tensor, got {m0.dtype}")
        return m0.reshape(())
    (value,) = _params(m0=m0)
    if not math.isfinite(value):
        raise ValueError(f"m0 must be a finite number, got {value}")
    return value


def _m0_tensor(m0: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A checked ``m0`` as a tensor (the custom ops take tensors only)."""
    if isinstance(m0, torch.Tensor):
        return m0
    return torch.tensor(m0, dtype=torch.float64, device=like.device)


def _m0_on(m0: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """``m0`` for the scan: a float stays a float (no device copy); a tensor moves to ``like``."""
    if isinstance(m0, torch.Tensor):
        return m0.to(dtype=like.dtype, device=like.device)
    return m0


@functools.lru_cache(maxsize=64)
def _check_ranges(q: float, r: float, p0: float) -> None:
    """Raises ValueError naming a variance out of range (the core's own check, for every backend;
    called inside the ops, where torch.compile does not trace). Accepted values are remembered;
    a failure is raised again on every call (lru_cache keeps no exceptions)."""
    _core.gains(0, q, r, p0)


def _resolve_backend(backend: Any, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "rust" if device.type == "cpu" else "scan"
    if backend == "rust" and device.type != "cpu":
        raise ValueError(f"backend='rust' needs CPU tensors, got a tensor on {device}")
    return backend


def _widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype: float16/bfloat16 as float32, others unchanged (no call)."""
    return t.float() if t.dtype in _WIDENED else t


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    return t.detach().numpy() if t.device.type == "cpu" else t.detach().cpu().numpy()


def _gains(n: int, q: float, r: float, p0: float, device: torch.device) -> _scan.GainTable:
    """The gains for rows of up to ``n`` positions on ``device``, with the scan's derived tables.

    The gains do not depend on the data or on the row length, so one table per power-of-two
    capacity is built once and kept on the device (no host-to-device copy per call)."""
    capacity = max(1024, 1 << max(n - 1, 0).bit_length())
    return _gain_table(capacity, q, r, p0, device)


@functools.lru_cache(maxsize=16)
def _gain_table(n: int, q: float, r: float, p0: float, device: torch.device) -> _scan.GainTable:
    return _scan.GainTable(torch.from_numpy(_core.gains(n, q, r, p0)).to(device))


def _locate_non_finite(name: str, values: torch.Tensor, read: torch.Tensor | None, rows: Any):
    """A ValueError naming the first non-finite value the filter reads (row, position)."""
    bad = ~torch.isfinite(values)
    if read is not None:
        bad &= read
    hits = torch.nonzero(bad)
    if hits.numel() == 0:
        return ValueError(f"{name}: the result overflowed although every input is finite")
    row, pos = rows(hits[0])
    return ValueError(f"{name}: non-finite value at row {row}, position {pos}")


def _padded_rows(hit: torch.Tensor) -> tuple[int, int]:
    return int(hit[0]), int(hit[1])


def _packed_rows(cu: np.ndarray):
    def rows(hit: torch.Tensor) -> tuple[int, int]:
        flat = int(hit[0])
        row = int(np.searchsorted(cu, flat, side="right")) - 1
        return row, flat - int(cu[row])

    return rows


# --------------------------------------------------------------------------------------------
# Backend dispatch (eager implementations behind the custom ops)


def _to_torch(arrays: tuple[np.ndarray, ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """numpy results as tensors with ``like``'s device and dtype (no copy where they match)."""
    out = tuple(torch.from_numpy(a) for a in arrays)
    if like.device.type == "cpu" and all(t.dtype == like.dtype for t in out):
        return out
    return tuple(t.to(device=like.device, dtype=like.dtype) for t in out)


def _check_scan(witness: torch.Tensor, name: str, inputs, read, rows) -> None:
    """The scan's finiteness check, one small reduction and one host synchronisation per call.

    ``witness`` holds the states that every input read reaches: each row's last state for the
    forward pass, its first ``dz`` for the adjoint (for packed rows filtered as one flat row, the
    last or first of all). A non-finite value read anywhere makes it non-finite: the scan combines
    values only by sums and by products with coefficients in ``[0, 1]``, and ``0 * inf`` and
    ``0 * nan`` are nan, so not even a gain of exactly 1 (``a = 0``) or a cut between packed
    rows stops one.
    """
    if not bool(torch.isfinite(witness).all()):
        raise _locate_non_finite(name, inputs, read, rows)


def _forward_padded(z, mask, m0, q, r, p0, masked, backend):
    _check_ranges(q, r, p0)
    zc = _widen(z)
    if backend == "rust":
        return _to_torch(
            (_core.filter_padded(_numpy(zc), _numpy(mask), q, r, p0, float(m0), masked),), z
        )[0]
    if backend == "reference":
        out = _reference.kalman_filter(
            _numpy(zc), _numpy(mask), q=q, r=r, p0=p0, m0=float(m0), masked=masked
        )
        return _to_torch((out,), z)[0]
    table = _gains(z.shape[1], q, r, p0, z.device)
    out, witness = _scan.filter_padded(zc, mask, _m0_on(m0, zc), table, masked)
    _check_scan(witness, "values", zc, mask, _padded_rows)
    return _narrow(out, z.dtype)


def _adjoint_padded(g, mask, q, r, p0, masked, backend):
    _check_ranges(q, r, p0)
    gc = _widen(g)
    if backend == "rust":
        return _to_torch(_core.adjoint_padded(_numpy(gc), _numpy(mask), q, r, p0, masked), g)
    if backend == "reference":
        return _to_torch(
            _reference.kalman_filter_adjoint(
                _numpy(gc), _numpy(mask), q=q, r=r, p0=p0, masked=masked
            ),
            g,
        )
    table = _gains(g.shape[1], q, r, p0, g.device)
    dz, dm0, witness = _scan.adjoint_padded(gc, mask, table, masked)
    _check_scan(witness, "grad", gc, mask if masked == "zero" else None, _padded_rows)
    return _narrow(dz, g.dtype), _narrow(dm0, g.dtype)


def _forward_packed(values, cu_seqlens, mask, m0, q, r, p0, masked, backend):
    _check_ranges(q, r, p0)
    vc = _widen(values)
    cu = _numpy(cu_seqlens)
    longest = _core.check_offsets(cu, values.shape[0])
    if backend == "rust":
        return _to_torch(
            (_core.filter_packed(_numpy(vc), cu, _numpy(mask), q, r, p0, float(m0), masked),),
            values,
        )[0]
    if backend == "reference":
        out = _reference.kalman_filter_packed(
            _numpy(vc), cu, _numpy(mask), q=q, r=r, p0=p0, m0=float(m0), masked=masked
        )
        return _to_torch((out,), values)[0]
    table = _gains(longest, q, r, p0, values.device)
    out, witness = _scan.filter_packed(vc, cu_seqlens, longest, mask, _m0_on(m0, vc), table, masked)
    _check_scan(witness, "values", vc, mask, _packed_rows(cu))
    return _narrow(out, values.dtype)


def _adjoint_packed(g, cu_seqlens, mask, q, r, p0, masked, backend):
    _check_ranges(q, r, p0)
    gc = _widen(g)
    cu = _numpy(cu_seqlens)
    longest = _core.check_offsets(cu, g.shape[0])
    if backend == "rust":
        return _to_torch(_core.adjoint_packed(_numpy(gc), cu, _numpy(mask), q, r, p0, masked), g)
    if backend == "reference":
        adj = _reference.kalman_filter_packed_adjoint(
            _numpy(gc), cu, _numpy(mask), q=q, r=r, p0=p0, masked=masked
        )
        return _to_torch(adj, g)
    table = _gains(longest, q, r, p0, g.device)
    dz, dm0, witness = _scan.adjoint_packed(gc, cu_seqlens, longest, mask, table, masked)
    _check_scan(witness, "grad", gc, mask if masked == "zero" else None, _packed_rows(cu))
    return _narrow(dz, g.dtype), _narrow(dm0, g.dtype)


# --------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("kpo_rs::kalman_filter", mutates_args=())
def _filter_op(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    m0: torch.Tensor,
    q: float,
    r: float,
    p0: float,
    masked: str,
    backend: str,
) -> torch.Tensor:
    return _forward_padded(z, mask, m0, q, r, p0, masked, backend).contiguous()


# The fake kernels say what the real ones return: contiguous tensors, whatever the inputs' strides.
@_filter_op.register_fake
def _(z, mask, m0, q, r, p0, masked, backend):
    return z.new_empty(z.shape)


@torch.library.custom_op("kpo_rs::kalman_filter_adjoint", mutates_args=())
def _adjoint_op(
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    q: float,
    r: float,
    p0: float,
    masked: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dz, dm0 = _adjoint_padded(grad, mask, q, r, p0, masked, backend)
    return dz.contiguous(), dm0.contiguous()


@_adjoint_op.register_fake
def _(grad, mask, q, r, p0, masked, backend):
    return grad.new_empty(grad.shape), grad.new_empty(grad.shape[0])


@torch.library.custom_op("kpo_rs::kalman_filter_packed", mutates_args=())
def _packed_op(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    m0: torch.Tensor,
    q: float,
    r: float,
    p0: float,
    masked: str,
    backend: str,
) -> torch.Tensor:
    return _forward_packed(values, cu_seqlens, mask, m0, q, r, p0, masked, backend).contiguous()


@_packed_op.register_fake
def _(values, cu_seqlens, mask, m0, q, r, p0, masked, backend):
    return values.new_empty(values.shape)


@torch.library.custom_op("kpo_rs::kalman_filter_packed_adjoint", mutates_args=())
def _packed_adjoint_op(
    grad: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    q: float,
    r: float,
    p0: float,
    masked: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dz, dm0 = _adjoint_packed(grad, cu_seqlens, mask, q, r, p0, masked, backend)
    return dz.contiguous(), dm0.contiguous()


@_packed_adjoint_op.register_fake
def _(grad, cu_seqlens, mask, q, r, p0, masked, backend):
    return grad.new_empty(grad.shape), grad.new_empty(cu_seqlens.shape[0] - 1)


def _m0_grad(ctx, dm0_rows: torch.Tensor) -> torch.Tensor | None:
    if not ctx.m0_needs_grad:
        return None
    return dm0_rows.sum().to(ctx.m0_dtype)


def _setup_padded(ctx, inputs, output):
    _z, mask, m0, q, r, p0, masked, backend = inputs
    ctx.save_for_backward(mask)
    ctx.args = (q, r, p0, masked, backend)
    ctx.m0_needs_grad = m0.requires_grad
    ctx.m0_dtype = m0.dtype


def _backward_padded(ctx, grad):
    (mask,) = ctx.saved_tensors
    dz, dm0 = _adjoint_op(grad.contiguous(), mask, *ctx.args)
    return dz, None, _m0_grad(ctx, dm0), None, None, None, None, None


def _setup_packed(ctx, inputs, output):
    _values, cu_seqlens, mask, m0, q, r, p0, masked, backend = inputs
    ctx.save_for_backward(cu_seqlens, mask)
    ctx.args = (q, r, p0, masked, backend)
    ctx.m0_needs_grad = m0.requires_grad
    ctx.m0_dtype = m0.dtype


def _backward_packed(ctx, grad):
    cu_seqlens, mask = ctx.saved_tensors
    dz, dm0 = _packed_adjoint_op(grad.contiguous(), cu_seqlens, mask, *ctx.args)
    return dz, None, None, _m0_grad(ctx, dm0), None, None, None, None, None


_filter_op.register_autograd(_backward_padded, setup_context=_setup_padded)
_packed_op.register_autograd(_backward_packed, setup_context=_setup_packed)


# --------------------------------------------------------------------------------------------
# Eager autograd: the same implementations and formulas as the custom ops, without the
# dispatcher's per-call cost (the custom ops serve torch.compile)


def _check_options(
    values: torch.Tensor, q: Any, r: Any, p0: Any, m0: Any, masked: Any, backend: Any
) -> tuple[float | torch.Tensor, tuple[float, float, float, str, str]]:
    """The public functions' keyword arguments, checked: ``(m0, (q, r, p0, masked, backend))``."""
    q, r, p0 = _params(q=q, r=r, p0=p0)
    options = (q, r, p0, _check_masked(masked), _resolve_backend(backend, values.device))
    return _check_m0(m0), options


def _needs_graph(values: torch.Tensor, m0: float | torch.Tensor) -> bool:
    """Whether the call must record an autograd node (else the forward runs directly, which is
    cheaper: the detached log-ratio of the default KPO loss is filtered this way)."""
    if not torch.is_grad_enabled():
        return False
    return values.requires_grad or (isinstance(m0, torch.Tensor) and m0.requires_grad)


class _PaddedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mask, m0, q, r, p0, masked, backend):
        ctx.save_for_backward(mask)
        ctx.args = (q, r, p0, masked, backend)
        ctx.m0_needs_grad = ctx.needs_input_grad[2]
        ctx.m0_dtype = m0.dtype if isinstance(m0, torch.Tensor) else None
        return _forward_padded(z, mask, m0, q, r, p0, masked, backend)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        dz, dm0 = _adjoint_padded(grad.contiguous(), mask, *ctx.args)
        return dz, None, _m0_grad(ctx, dm0), None, None, None, None, None


class _PackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens, mask, m0, q, r, p0, masked, backend):
        ctx.save_for_backward(cu_seqlens, mask)
        ctx.args = (q, r, p0, masked, backend)
        ctx.m0_needs_grad = ctx.needs_input_grad[3]
        ctx.m0_dtype = m0.dtype if isinstance(m0, torch.Tensor) else None
        return _forward_packed(values, cu_seqlens, mask, m0, q, r, p0, masked, backend)

    @staticmethod
    def backward(ctx, grad):
        cu_seqlens, mask = ctx.saved_tensors
        dz, dm0 = _adjoint_packed(grad.contiguous(), cu_seqlens, mask, *ctx.args)
        return dz, None, None, _m0_grad(ctx, dm0), None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API


def kalman_filter(
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    q: float = DEFAULT_Q,
    r: float = DEFAULT_R,
    p0: float = DEFAULT_P0,
    m0: float | torch.Tensor = DEFAULT_M0,
    masked: str = "hold",
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable causal Kalman filter of each row of a padded batch.

    Args:
        z: ``[batch, time]`` observations (float32/float64/float16/bfloat16), e.g. token
            log-ratios ``logp - old_logp``. Its gradient is the filter's adjoint.
        mask: optional ``[batch, time]`` bool tensor on ``z``'s device, True at valid tokens.
        q, r, p0: process-noise, observation-noise and prior variances (see :mod:`kpo_rs`).
        m0: prior mean, a float or a scalar tensor (differentiable when it requires grad).
        masked: ``"hold"`` or ``"zero"`` (see :mod:`kpo_rs`).
        backend: ``"auto"``, ``"rust"``, ``"scan"`` or ``"reference"``.

    Returns:
        ``[batch, time]`` filtered states in ``z``'s dtype and device.
    """
    _check_values("z", z, 2, "[batch, time]")
    _check_mask(mask, z, "z")
    m0, (q, r, p0, masked, backend) = _check_options(z, q, r, p0, m0, masked, backend)
    if torch.compiler.is_compiling():
        return _filter_op(z, mask, _m0_tensor(m0, z), q, r, p0, masked, backend)
    if not _needs_graph(z, m0):
        return _forward_padded(z, mask, m0, q, r, p0, masked, backend)
    return _PaddedFunction.apply(z, mask, m0, q, r, p0, masked, backend)


def kalman_filter_packed(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    q: float = DEFAULT_Q,
    r: float = DEFAULT_R,
    p0: float = DEFAULT_P0,
    m0: float | torch.Tensor = DEFAULT_M0,
    masked: str = "hold",
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable causal Kalman filter of packed sequences.

    Args:
        values: ``[total]`` observations; row ``i`` is ``values[cu_seqlens[i]:cu_seqlens[i+1]]``.
        cu_seqlens: ``[batch + 1]`` int32/int64 offsets (first 0, non-decreasing, last
            ``total``), on any device (they are read on the host once per call).
        mask, q, r, p0, m0, masked, backend: as in :func:`kalman_filter`.

    Returns:
        ``[total]`` filtered states in ``values``' dtype and device.
    """
    _check_values("values", values, 1, "[total]")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
    _check_mask(mask, values, "values")
    m0, (q, r, p0, masked, backend) = _check_options(values, q, r, p0, m0, masked, backend)
    if torch.compiler.is_compiling():
        return _packed_op(
            values, cu_seqlens, mask, _m0_tensor(m0, values), q, r, p0, masked, backend
        )
    if not _needs_graph(values, m0):
        return _forward_packed(values, cu_seqlens, mask, m0, q, r, p0, masked, backend)
    return _PackedFunction.apply(values, cu_seqlens, mask, m0, q, r, p0, masked, backend)
