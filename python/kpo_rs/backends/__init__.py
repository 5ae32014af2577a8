"""The backends of the torch op, one module each, chosen from one table.

Every backend module offers the same two entries, one per direction, for both layouts; each
takes the call's :class:`~kpo_rs.backends.Rows` (values, ``cu_seqlens``, mask, settings, longest
packed row; see docs/design.md, "Backends"):

``forward(rows, m0) -> Tensor``
    ``rows.values`` float32 or float64 (the op computes float16/bfloat16 in float32), padded
    ``[batch, time]`` or packed ``[total]``; ``m0`` a float or a 0-d tensor in the values' dtype
    and device (apart from ``rows.params``, whose ``m0`` is ignored, so that a tensor can carry a
    gradient). Returns the filtered values, same shape and dtype.
``adjoint(rows) -> (dvalues, dm0)``
    The vector-Jacobian product for the upstream gradient ``rows.values``: ``dvalues`` shaped
    like it, ``dm0`` ``[batch]`` (one per row; the op sums them for a scalar ``m0``).

``rows.cu_seqlens`` reaches a backend validated (first 0, non-decreasing, last ``total``), with
the longest row's length as ``rows.longest`` (None for the padded layout), which device backends
use to size their gain tables without reading the offsets again. Backends that run without host
synchronisation list their ``CHECKS`` and take ``check=`` (see :mod:`kpo_rs.torch_ops`). Each
backend raises ``ValueError("values: non-finite value at row R, position P")`` (``grad:`` for
the adjoint) for a non-finite value it reads, except where its module says otherwise.

The table (:data:`BACKENDS`) maps a name to its module, imported on first use so that an optional
dependency (triton) costs nothing until it is asked for. ``"auto"`` picks ``"rust"`` on CPU,
``"triton"`` on CUDA where triton is importable, and ``"scan"`` elsewhere.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType

import torch

from ._rows import Rows

__all__ = ["BACKENDS", "NAMES", "Rows", "load", "loaded", "resolve"]

#: Backend name -> (module, what it needs). ``scan_doubling`` is the scan with recursive doubling
#: everywhere and packed rows filtered as one flat row: it keeps no cached matrices (for very long
#: rows, or to exercise that method on the inputs the matrix method would take).
BACKENDS: dict[str, tuple[str, str]] = {
    "rust": ("kpo_rs.backends.rust", "CPU tensors"),
    "scan": ("kpo_rs.backends.scan", "any device"),
    "scan_doubling": ("kpo_rs.backends.scan_doubling", "any device"),
    "reference": ("kpo_rs.backends.reference", "CPU tensors (slow; for tests)"),
    "triton": ("kpo_rs.backends.triton", "CUDA tensors and triton (CPU under TRITON_INTERPRET=1)"),
}
NAMES = ("auto", *BACKENDS)


@functools.cache
def load(name: str) -> ModuleType:
    """The module of backend ``name`` (imported once)."""
    return importlib.import_module(BACKENDS[name][0])


def loaded(name: str) -> bool:
    """Whether backend ``name``'s module has been imported (by :func:`load` or otherwise)."""
    return BACKENDS[name][0] in sys.modules


@functools.lru_cache(maxsize=64)
def _triton_usable(device: torch.device, interpret: str | None) -> bool:
    """``interpret``: only a cache key (the triton module reads the variable itself)."""
    try:
        return bool(load("triton").available(device))
    except ImportError:
        return False


@torch.compiler.assume_constant_result
def _triton_runs_on(device: torch.device) -> bool:
    """Whether the triton backend runs on ``device`` (cached; under ``torch.compile`` a constant
    of the trace, so that dynamo does not trace the import). On CPU the answer depends on
    ``TRITON_INTERPRET``, whose value is part of the cache key."""
    interpret = os.environ.get("TRITON_INTERPRET") if device.type == "cpu" else None
    return _triton_usable(device, interpret)


def resolve(name: object, device: torch.device) -> str:
    """The concrete backend for ``name`` on ``device``; ValueError naming ``backend`` when the
    name is unknown or the backend cannot run there."""
    if name == "auto":
        if device.type == "cpu":
            return "rust"
        if device.type == "cuda" and _triton_runs_on(device):
            return "triton"
        return "scan"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name in ("rust", "reference") and device.type != "cpu":
        raise ValueError(f"backend={name!r} needs CPU tensors, got a tensor on {device}")
    if name == "triton" and not _triton_runs_on(device):
        raise ValueError(
            f"backend='triton' cannot run on {device}: it needs CUDA tensors and triton "
            "(pip install triton; on CPU only under TRITON_INTERPRET=1)"
        )
    return name
