"""The adapter of the backends that compute on the host through numpy (rust, reference).

Such a backend supplies two numpy functions, ``forward(values, cu_seqlens, mask, m0, params)``
and ``adjoint(grad, cu_seqlens, mask, params)`` over ndarrays (``cu_seqlens`` and ``mask`` may be
None, ``m0`` is a float); :func:`host_backend` turns them into the backend entries of
:mod:`kpo_rs.backends` on CPU tensors, without copies where dtypes match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from ..params import FilterParams
from ._rows import Rows

__all__ = ["host_backend"]

#: The host functions' optional arrays (``cu_seqlens``, ``mask``): an ndarray, or None.
OptionalArray = Optional[np.ndarray]
ForwardNumpy = Callable[[np.ndarray, OptionalArray, OptionalArray, float, FilterParams], np.ndarray]
AdjointNumpy = Callable[
    [np.ndarray, OptionalArray, OptionalArray, FilterParams], tuple[np.ndarray, np.ndarray]
]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _optional(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else _numpy(t)


def _torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A numpy result as a tensor in ``like``'s dtype (no copy where it matches)."""
    t = torch.from_numpy(array)
    return t if t.dtype == like.dtype else t.to(like.dtype)


def host_backend(
    forward_np: ForwardNumpy, adjoint_np: AdjointNumpy
) -> tuple[Callable, Callable, Callable]:
    """``(available, forward, adjoint)`` of a backend computing with ``forward_np`` and
    ``adjoint_np`` on CPU tensors (``rows.longest`` is not needed on the host)."""

    def available(device: torch.device) -> bool:
        return device.type == "cpu"

    def forward(rows: Rows, m0: float) -> torch.Tensor:
        values, cu_seqlens, mask, params, _ = rows
        out = forward_np(_numpy(values), _optional(cu_seqlens), _optional(mask), float(m0), params)
        return _torch(out, values)

    def adjoint(rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        grad, cu_seqlens, mask, params, _ = rows
        dz, dm0 = adjoint_np(_numpy(grad), _optional(cu_seqlens), _optional(mask), params)
        return _torch(dz, grad), _torch(dm0, grad)

    return available, forward, adjoint
