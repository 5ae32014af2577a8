"""The chunked parallel scan written in torch (:mod:`kpo_rs.backends._scan`); any device.

The matrix method where the gains are shared by the rows and float32 matmuls are exact, recursive
doubling elsewhere (see :mod:`kpo_rs.backends._scan`). The finiteness check costs one small
reduction and one host synchronisation per call: the scan's witness (each row's last state for the
forward pass, its first ``dz`` for the adjoint) is non-finite if and only if some value read is,
because the scan combines values only by sums and by products with coefficients in ``[0, 1]``, and
``0 * inf`` and ``0 * nan`` are nan (not even a gain of exactly 1 or a cut between packed rows stops
one)."""

from __future__ import annotations

import torch

from . import _non_finite, _scan, register
from ._device_gains import gain_table
from ._rows import Rows

__all__ = ["adjoint", "available", "forward"]


def available(device: torch.device) -> bool:
    return True


def _check(witness: torch.Tensor, name: str, inputs, read, cu_seqlens) -> None:
    if not bool(torch.isfinite(witness).all()):
        raise _non_finite.locate(name, inputs, read, cu_seqlens)


def _table(rows: Rows) -> tuple[_scan.GainTable, Rows]:
    """The gain table of ``rows`` (as long as a padded batch's time axis or the longest packed
    row), and the rows :meth:`~kpo_rs.backends._rows.Rows.measured`."""
    rows = rows.measured()
    longest = rows.values.shape[1] if rows.longest is None else rows.longest  # set when packed
    return gain_table(longest, rows.params, rows.values.device), rows


def forward(rows: Rows, m0: float | torch.Tensor, *, doubling: bool = False) -> torch.Tensor:
    table, rows = _table(rows)
    out, witness = _scan.forward(rows, m0, table, doubling=doubling)
    _check(witness, "values", rows.values, rows.mask, rows.cu_seqlens)
    return out


def adjoint(rows: Rows, *, doubling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    table, rows = _table(rows)
    dz, dm0, witness = _scan.adjoint(rows, table, doubling=doubling)
    # under "hold" every grad value is read (held outputs depend on the state); under "zero" only
    # the valid ones
    read = rows.mask if rows.params.masked == "zero" else None
    _check(witness, "grad", rows.values, read, rows.cu_seqlens)
    return dz, dm0


# "auto" on every device but the CPU (CUDA included: plain torch operations); its error bound
# counts the scan's extra roundings (_scan.error_steps)
register(
    "scan", forward=forward, adjoint=adjoint, available=available, needs="any device",
    auto={"*": 1}, error_steps=_scan.error_steps,
)  # fmt: skip
