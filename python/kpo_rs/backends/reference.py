"""The plain loops of :mod:`kpo_rs.reference` (CPU tensors, float64 inside; slow, for tests)."""

from __future__ import annotations

import dataclasses

from .. import reference
from . import register
from ._host import host_backend

__all__ = ["adjoint", "available", "forward"]


def _forward(values, cu_seqlens, mask, m0, params):
    kw = {**dataclasses.asdict(params), "m0": m0}
    if cu_seqlens is None:
        return reference.kalman_filter(values, mask, **kw)
    return reference.kalman_filter_packed(values, cu_seqlens, mask, **kw)


def _adjoint(grad, cu_seqlens, mask, params):
    kw = dataclasses.asdict(params)
    if cu_seqlens is None:
        return reference.kalman_filter_adjoint(grad, mask, **kw)
    return reference.kalman_filter_packed_adjoint(grad, cu_seqlens, mask, **kw)


available, forward, adjoint = host_backend(_forward, _adjoint)

# the oracle the others are tested against: never "auto", not a choice for kpo doctor
register(
    "reference", forward=forward, adjoint=adjoint, available=available,
    needs="CPU tensors (slow; for tests)", choice=False,
)  # fmt: skip
