"""The backends of the torch op: one module each, every one registering itself here.

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
synchronisation register their ``checks`` and take ``check=`` (see :mod:`kpo_rs.torch_ops`).
Each backend raises ``ValueError("values: non-finite value at row R, position P")`` (``grad:``
for the adjoint) for a non-finite value it reads, at once or (``check="deferred"``) at
:func:`raise_deferred`.

The registry. Each backend module ends with one :func:`register` call naming its entries, the
devices it runs on (``available``), its rank for ``"auto"`` per device type, and its error bound
(``error_steps``: the row length to give :func:`kpo_rs.testing.tolerance` for its results).
Importing this package imports every public module in it (none imports an optional dependency
at import time), so adding a backend is adding its module. :func:`resolve`, the tests and
``kpo doctor`` read :func:`registered`. ``"auto"`` picks the available backend of highest rank on
the tensor's device: ``"rust"`` on CPU, ``"scan"`` elsewhere (CUDA included: the triton
backend takes part in ``"auto"`` only once ``kpo_rs.backends.triton.TRITON_VALIDATED`` is set,
after its evidence from a real GPU is committed in docs/gpu.md).
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ._rows import Rows

__all__ = [
    "Backend",
    "Rows",
    "get",
    "names",
    "raise_deferred",
    "register",
    "registered",
    "resolve",
    "unregister",
]


def _same_length(length: int) -> int:
    return length


@dataclass(frozen=True)
class Backend:
    """One registered backend (built by :func:`register`).

    Attributes:
        name: what ``backend=`` says.
        forward, adjoint: the two entries (see the package docstring).
        available: ``available(device) -> bool``: whether it runs on tensors on ``device``.
        needs: one line saying what it needs, for tables and errors ("CPU tensors").
        auto: device type -> rank: ``"auto"`` picks the available backend of highest rank on a
            tensor's device type (``"*"``: any device type). Empty: never picked by ``"auto"``.
        error_steps: ``error_steps(length) -> int``, the row length to give
            :func:`kpo_rs.testing.tolerance` for this backend's results on rows of ``length``
            tokens: its error bound, used by the tests and ``kpo doctor`` alike.
        checks: the ``check=`` policies it takes (empty: it checks every call at once).
        raise_deferred: for a backend with ``"deferred"`` among its ``checks``:
            ``raise_deferred(device)`` raises the first recorded non-finite value's ValueError.
        why_not: ``why_not(device) -> str``, why it cannot run on ``device`` (for the error);
            default: ``"it needs " + needs``.
        warning: said once per process (``UserWarning``) when it is chosen by name; None: never.
        choice: False for a backend that exists for tests (the plain loop): ``kpo doctor``
            leaves it out.
    """

    name: str
    forward: Callable[..., torch.Tensor]
    adjoint: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    available: Callable[[torch.device], bool]
    needs: str
    auto: Mapping[str, int] = field(default_factory=dict)
    error_steps: Callable[[int], int] = _same_length
    checks: tuple[str, ...] = ()
    raise_deferred: Callable[[torch.device | None], None] | None = None
    why_not: Callable[[torch.device], str] | None = None
    warning: str | None = None
    choice: bool = True

    def reason(self, device: torch.device) -> str:
        """Why it cannot run on ``device``: one clause."""
        return self.why_not(device) if self.why_not is not None else f"it needs {self.needs}"


_REGISTRY: dict[str, Backend] = {}
_warned: set[str] = set()


def register(
    name: str,
    *,
    forward: Callable[..., torch.Tensor],
    adjoint: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    available: Callable[[torch.device], bool],
    needs: str,
    auto: Mapping[str, int] | None = None,
    error_steps: Callable[[int], int] = _same_length,
    checks: tuple[str, ...] = (),
    raise_deferred: Callable[[torch.device | None], None] | None = None,
    why_not: Callable[[torch.device], str] | None = None,
    warning: str | None = None,
    choice: bool = True,
) -> Backend:
    """Registers backend ``name`` (the fields of :class:`Backend`) and returns its entry.
    ValueError when ``name`` is ``"auto"``, not an identifier, or taken."""
    if not isinstance(name, str) or not name.isidentifier() or name == "auto":
        raise ValueError(f"name must be an identifier other than 'auto', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"name: backend {name!r} is already registered")
    entry = Backend(
        name,
        forward,
        adjoint,
        available,
        needs,
        MappingProxyType(dict(auto or {})),
        error_steps,
        tuple(checks),
        raise_deferred,
        why_not,
        warning,
        choice,
    )
    _REGISTRY[name] = entry
    return entry


def unregister(name: str) -> None:
    """Removes backend ``name`` (a test's runtime backend); ValueError when it is not there."""
    if name not in _REGISTRY:
        raise ValueError(f"name: no backend {name!r} is registered")
    del _REGISTRY[name]
    _warned.discard(name)


def registered() -> Mapping[str, Backend]:
    """Every registered backend by name, in registration order (read-only view)."""
    return MappingProxyType(_REGISTRY)


def names() -> tuple[str, ...]:
    """``"auto"`` and the registered backends' names: what ``backend=`` accepts."""
    return ("auto", *_REGISTRY)


def get(name: str) -> Backend:
    """The entry of backend ``name``; ValueError naming ``backend`` otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be one of {names()}, got {name!r}") from None


def _auto(device: torch.device) -> str:
    ranked = sorted(
        (b for b in _REGISTRY.values() if device.type in b.auto or "*" in b.auto),
        key=lambda b: -b.auto.get(device.type, b.auto.get("*", 0)),
    )
    for b in ranked:
        if b.available(device):
            return b.name
    raise ValueError(f"backend='auto': no registered backend runs on {device}")


@torch.compiler.assume_constant_result
def _choose(name: str, device: torch.device) -> str:
    """The backend for ``name`` (checked) on ``device``; under ``torch.compile`` a constant of
    the trace, so that dynamo does not trace the availability checks or the warning."""
    if name == "auto":
        return _auto(device)
    entry = _REGISTRY[name]
    if not entry.available(device):
        raise ValueError(f"backend={name!r} cannot run on {device}: {entry.reason(device)}")
    if entry.warning is not None and name not in _warned:
        _warned.add(name)
        warnings.warn(entry.warning, UserWarning, stacklevel=5)
    return name


def resolve(name: object, device: torch.device) -> str:
    """The concrete backend for ``name`` on ``device``; ValueError naming ``backend`` when the
    name is unknown or the backend cannot run there. A backend registered with a ``warning``
    says it once per process when chosen by name."""
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY):
        raise ValueError(f"backend must be one of {names()}, got {name!r}")
    return _choose(name, device)


def raise_deferred(device: torch.device | str | None = None) -> None:
    """Raises the ValueError of the first non-finite value that a call with
    ``check="deferred"`` recorded since the last check, on ``device`` (or every device), for
    every backend that defers; clears the records. Nothing to do where none deferred."""
    dev = None if device is None else torch.device(device)
    for b in list(_REGISTRY.values()):
        if b.raise_deferred is not None:
            b.raise_deferred(dev)


def _modules() -> Iterator[str]:
    """The public modules of this package: one backend each."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            yield f"{__name__}.{info.name}"


def _load_all() -> None:
    """Imports every backend module (each registers itself), in name order."""
    for module in sorted(_modules()):
        importlib.import_module(module)


_load_all()
