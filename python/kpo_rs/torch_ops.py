"""The filter as a differentiable torch op.

``kalman_filter`` filters a padded batch ``[batch, time]``, or packed rows ``[total]`` when given
``cu_seqlens`` (``kalman_filter_packed`` is that call with ``cu_seqlens`` positional). Both run one
internal entry per direction (forward, adjoint), registered with ``torch.library`` as custom ops
(``kpo_rs::filter`` and ``kpo_rs::filter_adjoint``) with fake-tensor kernels and one autograd
formula, so ``torch.compile(fullgraph=True)`` traces them without graph breaks; in eager mode the
same implementations run through a ``torch.autograd.Function`` sharing that formula, which skips
the dispatcher's per-call cost. The backward pass is the filter's exact adjoint. Every backend
receives the call's :class:`~kpo_rs.backends.Rows`.

Backends (the registry of :mod:`kpo_rs.backends`, one module each)
    ``"rust"``: the Rust core (CPU tensors; zero-copy when contiguous).
    ``"scan"``: a chunked parallel scan written in torch (:mod:`kpo_rs.backends._scan`); any device.
    ``"scan_doubling"``: the scan with recursive doubling only (keeps no cached matrices).
    ``"triton"``: fused Triton kernels, one launch per direction (CUDA; optional dependency;
    opt-in: not yet validated on GPU hardware, it warns once per process).
    ``"reference"``: the plain loop of :mod:`kpo_rs.reference` (slow; for tests).
    ``"auto"`` (default): ``"rust"`` on CPU, ``"scan"`` elsewhere, CUDA included (``"triton"``
    once its GPU evidence is committed: ``kpo_rs.backends.triton.TRITON_VALIDATED``).

Non-finite inputs raise ``ValueError`` naming the row and position. The scan finds out with one
small reduction and the synchronisation it makes anyway; the triton backend does not synchronise
the host: with ``check="deferred"`` (default) its kernels record the first bad value in device
memory and :func:`check_finite` raises it (call it where training synchronises anyway; the losses
of :mod:`kpo_rs.losses` and the plug-ins do it for you); ``check="sync"`` reads the record after
every call. Packed offsets are checked on the host once per call: keep ``cu_seqlens`` on the CPU to
avoid a synchronisation there.

Dtypes: float32 and float64 are computed natively; float16 and bfloat16 in float32, returned (and
differentiated) in their own dtype. Settings and masks are as in :mod:`kpo_rs`
(:class:`~kpo_rs.FilterParams`). ``m0`` may also be a scalar tensor; when it requires grad it
receives its gradient. The contract: docs/design.md.

Requires torch (``pip install 'kpo-rs[torch]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "kpo_rs.torch_ops needs PyTorch: pip install 'kpo-rs[torch]' (or pip install torch)"
    ) from exc

from . import backends
from .backends import Rows
from .params import FilterParams, Overrides, resolve_params

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "BACKENDS",
    "CHECKS",
    "FilterOptions",
    "check_finite",
    "kalman_filter",
    "kalman_filter_packed",
]

#: ``"auto"`` and the backends registered when this module was imported
#: (:func:`kpo_rs.backends.names` is the live list).
BACKENDS = backends.names()
#: When a backend that runs without host synchronisation reports a non-finite input.
CHECKS = ("deferred", "sync")
_NATIVE = (torch.float32, torch.float64)
_WIDENED = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Argument checks (shared by both layouts)


def _check_values(name: str, t: Any, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in _NATIVE + _WIDENED:
        raise TypeError(
            f"{name} must have dtype float32, float64, float16 or bfloat16, got {t.dtype}"
        )


def _check_mask(mask: Any, values: torch.Tensor, values_name: str) -> torch.Tensor | None:
    """The mask as the backends take it: bool, shaped like ``values`` on its device. An integer
    mask whose values are all 0 or 1 (verl's ``response_mask``) is read as bool; checking its
    values costs one host synchronisation on a device (pass a bool mask to avoid it), and is
    refused while compiling, where a data-dependent check would break the graph."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    integer = not (mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool)
    if mask.dtype != torch.bool and not integer:
        raise TypeError(
            f"mask must have dtype torch.bool (or an integer dtype holding only 0 and 1), "
            f"got {mask.dtype}"
        )
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} differs from {values_name} shape {tuple(values.shape)}"
        )
    if mask.device != values.device:
        raise ValueError(f"mask is on {mask.device}, {values_name} on {values.device}")
    return _integer_mask(mask) if integer else mask


def _integer_mask(mask: torch.Tensor) -> torch.Tensor:
    """An integer mask as bool; ``ValueError`` naming the first value other than 0 or 1."""
    if torch.compiler.is_compiling():
        raise TypeError(
            f"mask must have dtype torch.bool under torch.compile, got {mask.dtype} "
            "(pass mask.bool(): an integer mask's 0/1 check would break the graph)"
        )
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        index = [int(i) for i in torch.nonzero(bad)[0]]
        value = int(mask[tuple(index)])
        where = (
            f"row {index[0]}, position {index[1]}" if mask.dim() == 2 else f"position {index[0]}"
        )
        raise ValueError(
            f"mask: value {value} at {where} is not 0 or 1 (an integer mask must hold "
            "only 0 and 1; pass a bool mask otherwise)"
        )
    return mask != 0


def _check_m0(m0: Any) -> float | torch.Tensor | None:
    """``m0`` as given: None (from the settings), a float, or a 0-d floating-point tensor."""
    if m0 is None or not isinstance(m0, torch.Tensor):
        return m0
    if m0.numel() != 1:
        raise ValueError(f"m0 must be a scalar, got a tensor of shape {tuple(m0.shape)}")
    if not m0.is_floating_point():
        raise TypeError(f"m0 must be a floating-point tensor, got {m0.dtype}")
    return m0.reshape(())


def _check_offsets(cu_seqlens: Any) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")


def _check_option(entry: backends.Backend, check: str) -> dict[str, str]:
    """The ``check`` keyword for backends that run without host synchronisation (those that
    register ``checks``); the others check every call at once and take none."""
    return {"check": check} if entry.checks else {}


def check_finite(device: torch.device | str | None = None) -> None:
    """Raises the ``ValueError`` of the first non-finite input that a call with
    ``check="deferred"`` read since the last check (on ``device``, or on every device used),
    naming its row and position as the synchronous check does, and clears the record. One host
    synchronisation per device; nothing to do (and no import) where no such call ran.

    Call it where training synchronises anyway (after the loss's ``.item()``, at logging)."""
    backends.raise_deferred(device)


def _widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype: float16/bfloat16 as float32, others unchanged (no call)."""
    return t.float() if t.dtype in _WIDENED else t


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _settings(q: float, r: float, p0: float, masked: str) -> FilterParams:
    """The settings behind the custom ops' plain arguments (cached: :func:`resolve_params`)."""
    return resolve_params(q=q, r=r, p0=p0, masked=masked)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The two directions, any layout, any backend (eager implementations behind the custom ops)


def _prepare(
    rows: Rows, backend: str, check: str, contiguous: bool
) -> tuple[Rows, Any, dict[str, str]]:
    """``rows`` in the compute dtype (made contiguous if asked) with the longest packed row
    known, the backend's registry entry and its options."""
    values = _widen(rows.values.contiguous() if contiguous else rows.values)
    if values is not rows.values:
        rows = Rows(values, rows.cu_seqlens, rows.mask, rows.params, rows.longest)
    rows = rows.measured()
    entry = backends.get(backend)
    return rows, entry, _check_option(entry, check)


def _forward(
    rows: Rows, m0: float | torch.Tensor, backend: str, check: str = "sync"
) -> torch.Tensor:
    dtype = rows.values.dtype
    rows, entry, opts = _prepare(rows, backend, check, contiguous=False)
    if isinstance(m0, torch.Tensor):
        m0 = m0.to(dtype=rows.values.dtype, device=rows.values.device)
    return _narrow(entry.forward(rows, m0, **opts), dtype).contiguous()


def _adjoint(rows: Rows, backend: str, check: str = "sync") -> tuple[torch.Tensor, torch.Tensor]:
    dtype = rows.values.dtype
    rows, entry, opts = _prepare(rows, backend, check, contiguous=True)
    dz, dm0 = entry.adjoint(rows, **opts)
    return _narrow(dz, dtype).contiguous(), _narrow(dm0, dtype).contiguous()


#: The arguments of the custom op ``kpo_rs::filter`` and of the eager :class:`_Filter`, in order
#: (the op's schema below spells them out with their types; everything else refers to them
#: through this tuple and :func:`_forward_plain`). ``kpo_rs::filter_adjoint`` takes the same with
#: ``grad`` for ``values`` and without ``m0``.
OP_ARGS = ("values", "cu_seqlens", "mask", "m0", "q", "r", "p0", "masked", "backend", "check")
_M0 = OP_ARGS.index("m0")


def _forward_plain(values, cu_seqlens, mask, m0, q, r, p0, masked, backend, check):
    """:func:`_forward` from the custom op's plain arguments (:data:`OP_ARGS`; the op and the
    eager Function)."""
    return _forward(Rows(values, cu_seqlens, mask, _settings(q, r, p0, masked)), m0, backend, check)


def _adjoint_plain(grad, cu_seqlens, mask, q, r, p0, masked, backend, check):
    """:func:`_adjoint` from the adjoint op's plain arguments (:data:`OP_ARGS` with ``grad`` for
    ``values`` and no ``m0``; the op and the eager backward)."""
    return _adjoint(Rows(grad, cu_seqlens, mask, _settings(q, r, p0, masked)), backend, check)


# --------------------------------------------------------------------------------------------
# Custom ops (what torch.compile traces)


@torch.library.custom_op("kpo_rs::filter", mutates_args=())
def _filter_op(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    m0: torch.Tensor,
    q: float,
    r: float,
    p0: float,
    masked: str,
    backend: str,
    check: str,
) -> torch.Tensor:
    return _forward_plain(values, cu_seqlens, mask, m0, q, r, p0, masked, backend, check)


# The fake kernels say what the real ones return: contiguous tensors, whatever the inputs' strides.
@_filter_op.register_fake
def _(values, *_settings_and_options):
    return values.new_empty(values.shape)


@torch.library.custom_op("kpo_rs::filter_adjoint", mutates_args=())
def _adjoint_op(
    grad: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    q: float,
    r: float,
    p0: float,
    masked: str,
    backend: str,
    check: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _adjoint_plain(grad, cu_seqlens, mask, q, r, p0, masked, backend, check)


@_adjoint_op.register_fake
def _(grad, cu_seqlens, *_mask_settings_and_options):
    rows = grad.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return grad.new_empty(grad.shape), grad.new_empty(rows)


# --------------------------------------------------------------------------------------------
# One autograd formula, for the custom op and the eager Function alike


def _save(ctx: Any, inputs: tuple, m0_needs_grad: bool) -> None:
    """Saves what the backward needs from the op's ``inputs`` (:data:`OP_ARGS`): the layout
    tensors, and the settings and options after ``m0``, which the adjoint takes in that order."""
    cu_seqlens, mask, m0 = inputs[1], inputs[2], inputs[_M0]
    ctx.save_for_backward(cu_seqlens, mask)
    ctx.args = inputs[_M0 + 1 :]
    ctx.m0_needs_grad = m0_needs_grad
    ctx.m0_dtype = m0.dtype if isinstance(m0, torch.Tensor) else None


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    m0 = inputs[_M0]
    _save(ctx, inputs, isinstance(m0, torch.Tensor) and m0.requires_grad)


def _backward(ctx: Any, grad: torch.Tensor, adjoint: Any) -> tuple:
    cu_seqlens, mask = ctx.saved_tensors
    dz, dm0 = adjoint(grad, cu_seqlens, mask, *ctx.args)
    dm0 = dm0.sum().to(ctx.m0_dtype) if ctx.m0_needs_grad else None
    # one gradient per input of OP_ARGS: values and m0 have one
    return (dz, None, None, dm0, *(None,) * (len(OP_ARGS) - _M0 - 1))


_filter_op.register_autograd(
    lambda ctx, grad: _backward(ctx, grad, _adjoint_op), setup_context=_setup
)


class _Filter(torch.autograd.Function):
    """The eager path: the custom op's implementation and autograd formula, without the
    dispatcher's per-call cost. (The combined ``forward(ctx, ...)`` form: a separate
    ``setup_context`` makes every call bind its arguments by signature, which costs more than
    the filter itself at small batches.)"""

    @staticmethod
    def forward(ctx, *inputs):  # inputs: OP_ARGS
        _save(ctx, inputs, ctx.needs_input_grad[_M0])
        return _forward_plain(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, _adjoint_plain)


# --------------------------------------------------------------------------------------------
# Public API


class FilterOptions(Overrides, total=False):
    """The keyword options of :func:`kalman_filter` other than ``cu_seqlens`` (what
    :func:`kalman_filter_packed` passes on): the settings overrides, ``m0``, ``params``,
    ``backend`` and ``check``."""

    m0: float | torch.Tensor | None
    params: FilterParams | None
    backend: str
    check: str


def _run(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
    m0: Any,
    params: FilterParams | None,
    backend: Any,
    check: Any,
    overrides: Mapping[str, Any],
) -> torch.Tensor:
    """The body of :func:`kalman_filter` once the tensors are checked: settings resolved once,
    then the custom op (compiling), the direct forward (no gradient can flow) or the autograd
    Function."""
    m0 = _check_m0(m0)
    # (dynamo traces through lru_cache wrappers: resolve directly while compiling)
    resolve = FilterParams.resolve if torch.compiler.is_compiling() else resolve_params
    if m0 is not None and not isinstance(m0, torch.Tensor):
        overrides = {**overrides, "m0": m0}
    p = resolve(params, **overrides)
    prior = m0 if isinstance(m0, torch.Tensor) else p.m0
    name = backends.resolve(backend, values.device)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    args = (p.q, p.r, p.p0, p.masked, name, check)
    if torch.compiler.is_compiling():
        if not isinstance(prior, torch.Tensor):
            prior = torch.tensor(prior, dtype=torch.float64, device=values.device)
        return _filter_op(values, cu_seqlens, mask, prior, *args)
    needs_graph = torch.is_grad_enabled() and (
        values.requires_grad or (isinstance(prior, torch.Tensor) and prior.requires_grad)
    )
    if not needs_graph:
        # no autograd node (cheaper: the detached log-ratio of the default KPO loss goes here)
        return _forward(Rows(values, cu_seqlens, mask, p), prior, name, check)
    return _Filter.apply(values, cu_seqlens, mask, prior, *args)


def _check_layout(name: str, values: Any, cu_seqlens: Any, mask: Any) -> torch.Tensor | None:
    """Checks the tensors of a call; returns the mask as the backends take it (bool)."""
    if cu_seqlens is None:
        _check_values(name, values, 2, "[batch, time]")
    else:
        _check_values(name, values, 1, "[total] (packed: cu_seqlens is given)")
        _check_offsets(cu_seqlens)
    return _check_mask(mask, values, name)


def kalman_filter(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    m0: float | torch.Tensor | None = None,
    params: FilterParams | None = None,
    backend: str = "auto",
    check: str = "deferred",
    **overrides: Unpack[Overrides],
) -> torch.Tensor:
    """Differentiable causal Kalman filter of each row of a padded batch, or of packed rows.

    Args:
        values: ``[batch, time]`` observations (float32/float64/float16/bfloat16), e.g. token
            log-ratios ``logp - old_logp`` (nats); with ``cu_seqlens``, packed rows ``[total]``.
            Its gradient is the filter's adjoint. (The first argument is ``values`` everywhere:
            the numpy API, the reference and this op.)
        mask: optional bool tensor shaped like ``values`` on its device, True at valid tokens;
            an integer tensor holding only 0 and 1 (verl's ``response_mask``) is read as bool
            (its check costs one host synchronisation on a device; refused under
            ``torch.compile``: pass ``mask.bool()``).
        cu_seqlens: optional ``[batch + 1]`` int32/int64 offsets of packed rows: row ``i`` is
            ``values[cu_seqlens[i]:cu_seqlens[i + 1]]`` (first 0, non-decreasing, last ``total``),
            on any device (checked on the host once per call). See also
            :func:`kalman_filter_packed`.
        m0: prior mean, a float or a scalar tensor (differentiable when it requires grad);
            default ``params.m0``.
        params: the settings (default ``FilterParams()``, the KPO authors').
        backend: one of :data:`BACKENDS` (see the module documentation).
        check: when a non-finite input of a backend that runs without host synchronisation
            (``"triton"``) is reported: ``"deferred"`` (default) at :func:`check_finite`,
            ``"sync"`` at once (one synchronisation per call). The other backends always check
            at once. See the module documentation.
        **overrides: ``q``, ``r``, ``p0``, ``masked`` for this call, over ``params`` (see
            :class:`~kpo_rs.FilterParams`).

    Returns:
        Filtered states shaped like ``values``, in its dtype and on its device.
    """
    mask = _check_layout("values", values, cu_seqlens, mask)
    return _run(values, cu_seqlens, mask, m0, params, backend, check, overrides)


def kalman_filter_packed(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None = None,
    **options: Unpack[FilterOptions],
) -> torch.Tensor:
    """Differentiable causal Kalman filter of packed rows: ``kalman_filter(values, mask,
    cu_seqlens=cu_seqlens, **options)``.

    Args:
        values: ``[total]`` observations; row ``i`` is ``values[cu_seqlens[i]:cu_seqlens[i+1]]``.
        cu_seqlens: ``[batch + 1]`` int32/int64 offsets (first 0, non-decreasing, last
            ``total``), on any device (checked on the host once per call).
        mask: optional ``[total]`` bool tensor, True at valid tokens (or 0/1 integers, as in
            :func:`kalman_filter`).
        **options: ``m0``, ``params``, ``backend``, ``check`` and the overrides, as in
            :func:`kalman_filter`.

    Returns:
        ``[total]`` filtered states in ``values``' dtype and device.
    """
    mask = _check_layout("values", values, cu_seqlens, mask)
    return kalman_filter(values, mask, cu_seqlens=cu_seqlens, **options)
