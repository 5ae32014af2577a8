"""The adapter of the backends that compute on the host through numpy (rust, reference).

Such a backend supplies two numpy functions, ``forward(values, cu_seqlens, mask, m0, params)``
and ``adjoint(grad, cu_seqlens, mask, params)`` over ndarrays (``cu_seqlens`` and ``mask`` may be
None, ``m0`` is a float); :func:`host_backend` turns them into the backend entries of
:mod:`kpo_rs.backends` on CPU tensors, without copies where dtypes match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..params import FilterParams
from ._rows import Rows

__all__ = ["host_backend"]

Array = Any  # an ndarray or None


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _torch(arrays: tuple[np.ndarray, ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """numpy results as tensors in ``like``'s dtype (no copy where it matches)."""
    out = tuple(torch.from_numpy(a) for a in arrays)
    return tuple(t if t.dtype == like.dtype else t.to(like.dtype) for t in out)


def host_backend(
    forward_np: Callable[[np.ndarray, Array, Array, float, FilterParams], np.ndarray],
    adjoint_np: Callable[[np.ndarray, Array, Array, FilterParams], tuple[np.ndarray, np.ndarray]],
) -> tuple[Callable, Callable, Callable]:
    """``(available, forward, adjoint)`` of a backend computing with ``forward_np`` and
    ``adjoint_np`` on CPU tensors (``rows.longest`` is not needed on the host)."""

    def available(device: torch.device) -> bool:
        return device.type == "cpu"

    def forward(rows: Rows, m0: float) -> torch.Tensor:
        values, cu_seqlens, mask, params, _ = rows
        out = forward_np(_numpy(values), _numpy(cu_seqlens), _numpy(mask), float(m0), params)
        return _torch((out,), values)[0]

    def adjoint(rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        grad, cu_seqlens, mask, params, _ = rows
        return _torch(adjoint_np(_numpy(grad), _numpy(cu_seqlens), _numpy(mask), params), grad)

    return available, forward, adjoint
