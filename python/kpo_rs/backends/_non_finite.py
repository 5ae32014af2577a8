"""The error for a non-finite value a device backend read, naming its row and position."""

from __future__ import annotations

import torch

__all__ = ["locate"]


def locate(
    name: str, values: torch.Tensor, read: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> ValueError:
    """A ValueError naming the first non-finite value of ``values`` at a position the filter
    reads (``read``: a bool tensor, None for every position), as ``"{name}: non-finite value at
    row R, position P"`` with P counted from the row's start. Called only once a cheap check has
    seen a non-finite result, so its synchronisations cost nothing in the normal case."""
    bad = ~torch.isfinite(values)
    if read is not None:
        bad &= read
    hits = torch.nonzero(bad)
    if hits.numel() == 0:
        return ValueError(f"{name}: the result overflowed although every input is finite")
    if cu_seqlens is None:
        row, pos = int(hits[0, 0]), int(hits[0, 1])
    else:
        flat = int(hits[0, 0])
        cu = cu_seqlens.to(device="cpu", dtype=torch.int64)
        row = int(torch.searchsorted(cu, flat, right=True)) - 1
        pos = flat - int(cu[row])
    return ValueError(f"{name}: non-finite value at row {row}, position {pos}")
