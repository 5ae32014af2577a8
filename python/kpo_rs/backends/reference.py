"""The plain loops of :mod:`kpo_rs.reference` (CPU tensors, float64 inside; slow, for tests)."""

from __future__ import annotations

import dataclasses

import torch

from .. import reference
from ..params import FilterParams
from ._host import to_numpy, to_torch

__all__ = ["adjoint", "available", "forward"]


def available(device: torch.device) -> bool:
    return device.type == "cpu"


def forward(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    m0: float | torch.Tensor,
    params: FilterParams,
    *,
    longest: int | None = None,
) -> torch.Tensor:
    kw = {**dataclasses.asdict(params), "m0": float(m0)}
    v, m = to_numpy(values), to_numpy(mask)
    if cu_seqlens is None:
        out = reference.kalman_filter(v, m, **kw)
    else:
        out = reference.kalman_filter_packed(v, to_numpy(cu_seqlens), m, **kw)
    return to_torch((out,), values)[0]


def adjoint(
    grad: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    params: FilterParams,
    *,
    longest: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kw = dataclasses.asdict(params)
    g, m = to_numpy(grad), to_numpy(mask)
    if cu_seqlens is None:
        out = reference.kalman_filter_adjoint(g, m, **kw)
    else:
        out = reference.kalman_filter_packed_adjoint(g, to_numpy(cu_seqlens), m, **kw)
    return to_torch(out, grad)
