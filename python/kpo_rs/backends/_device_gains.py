"""The gains on the device, built once per (capacity, q, r, p0, device) and kept there.

The gains depend on neither the data nor the row length, so one table per power-of-two capacity
(at least 1024) serves every call with rows up to that length: no host-to-device copy per call.
Shared by the scan and triton backends.
"""

from __future__ import annotations

import functools

import torch

from .. import _core
from ..params import FilterParams
from . import _scan

__all__ = ["capacity", "gain_table"]


def capacity(n: int) -> int:
    """The table size that serves rows of up to ``n`` positions: a power of two, >= 1024."""
    return max(1024, 1 << max(n - 1, 0).bit_length())


def gain_table(n: int, params: FilterParams, device: torch.device) -> _scan.GainTable:
    """The gains ``K_0 .. K_{c-1}`` (``c = capacity(n)``) of ``params`` on ``device``, float64
    (``.k64``), with the scan's derived tables built on demand."""
    return _table(capacity(n), *params.variances, device)


@functools.lru_cache(maxsize=16)
def _table(n: int, q: float, r: float, p0: float, device: torch.device) -> _scan.GainTable:
    return _scan.GainTable(torch.from_numpy(_core.gains(n, q, r, p0)).to(device))
