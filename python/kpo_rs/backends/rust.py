"""The Rust core on CPU tensors (zero-copy when contiguous; the GIL is released)."""

from __future__ import annotations

from .. import _core
from . import register
from ._host import host_backend

__all__ = ["adjoint", "available", "forward"]


def _forward(values, cu_seqlens, mask, m0, params):
    return _core.filter(values, cu_seqlens, mask, params.variances, m0, params.masked)


def _adjoint(grad, cu_seqlens, mask, params):
    return _core.adjoint(grad, cu_seqlens, mask, params.variances, params.masked)


available, forward, adjoint = host_backend(_forward, _adjoint)

# "auto" on CPU: the exact recurrence, zero-copy, the GIL released
register(
    "rust", forward=forward, adjoint=adjoint, available=available, needs="CPU tensors",
    auto={"cpu": 2},
)  # fmt: skip
