"""The scan with recursive doubling everywhere and packed rows as one flat row.

It keeps no cached matrices, so it suits rows too long for the matrix method's tables, and the
tests run it on the same inputs as :mod:`kpo_rs.backends.scan` to cover both methods.
"""

from __future__ import annotations

import torch

from ..params import FilterParams
from . import scan

__all__ = ["adjoint", "available", "forward"]

available = scan.available


def forward(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    m0: float | torch.Tensor,
    params: FilterParams,
    *,
    longest: int | None = None,
) -> torch.Tensor:
    return scan.forward(values, cu_seqlens, mask, m0, params, longest=longest, doubling=True)


def adjoint(
    grad: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    params: FilterParams,
    *,
    longest: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return scan.adjoint(grad, cu_seqlens, mask, params, longest=longest, doubling=True)
