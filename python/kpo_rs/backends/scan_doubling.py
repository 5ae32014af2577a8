"""The scan with recursive doubling everywhere and packed rows as one flat row.

It keeps no cached matrices, so it suits rows too long for the matrix method's tables, and the
tests run it on the same inputs as :mod:`kpo_rs.backends.scan` to cover both methods.
"""

from __future__ import annotations

import functools

from . import _scan, register, scan

__all__ = ["adjoint", "available", "forward"]

available = scan.available
forward = functools.partial(scan.forward, doubling=True)
adjoint = functools.partial(scan.adjoint, doubling=True)

register(
    "scan_doubling", forward=forward, adjoint=adjoint, available=available, needs="any device",
    error_steps=_scan.error_steps,
)  # fmt: skip
