"""The Rust core on CPU tensors (zero-copy when contiguous; the GIL is released)."""

from __future__ import annotations

import torch

from .. import _core
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
    v, m = to_numpy(values), to_numpy(mask)
    if cu_seqlens is None:
        out = _core.filter_padded(v, m, *params.variances, float(m0), params.masked)
    else:
        cu = to_numpy(cu_seqlens)
        out = _core.filter_packed(v, cu, m, *params.variances, float(m0), params.masked)
    return to_torch((out,), values)[0]


def adjoint(
    grad: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    params: FilterParams,
    *,
    longest: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    g, m = to_numpy(grad), to_numpy(mask)
    if cu_seqlens is None:
        out = _core.adjoint_padded(g, m, *params.variances, params.masked)
    else:
        out = _core.adjoint_packed(g, to_numpy(cu_seqlens), m, *params.variances, params.masked)
    return to_torch(out, grad)
