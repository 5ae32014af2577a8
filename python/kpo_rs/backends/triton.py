"""The fused Triton backend: the filter in one kernel launch, its adjoint in one (two under
``masked="hold"`` with a mask), no host synchronisation unless asked for.

CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (triton's interpreter, for tests).
The kernels are in :mod:`kpo_rs.backends._triton_kernels`: one program per tile of ``BT`` tokens
of the flat token sequence (padded rows back to back, or the packed rows), a segmented
``tl.associative_scan`` over the recurrence's ``(decay, input)`` pairs inside the tile, and a
decoupled look-back over the tiles before it (tiles handed out in order by an atomic ticket) for
the state carried in. So few long rows fill the device as well as many short ones, and every token
is read once and written once (a two-pass carry fix-up would read it twice, which caps it at two
thirds of a copy's bandwidth). When the rows alone fill the device (the longest row at most one
multiprocessor's share of the tokens, see :func:`_per_row`) one program per row walks its row's
tiles in order instead, the carry in registers, with bitwise the same results. The look-back
applies the earlier tiles' maps in time order from the nearest published state, so a result is
the same on every run, whatever the programs' timing.
Under ``masked="hold"`` with a mask the adjoint runs a small pre-pass first (mask bytes only): its
gain index counts valid tokens from the row's start, against the adjoint's direction. The gains
stay on the device (one cached table per capacity, ``q``, ``r``, ``p0``, device and dtype). ``BT``
and the warp count follow from the token count and the device's multiprocessor count; nothing is
autotuned.

Non-finite values. The kernels record the first (row, position) of a non-finite value they read,
and of a non-finite result of finite inputs, with an atomic in device memory. When that is
reported depends on ``check``:

``"sync"``
    after the launch the call reads the record (one host synchronisation) and raises
    ``ValueError("values: non-finite value at row R, position P")`` (``grad: ...`` for the
    adjoint), as the other backends do;
``"deferred"`` (default)
    no synchronisation: the record is kept in a per-device buffer and
    :func:`raise_if_non_finite` (``kpo_rs.torch_ops.check_finite()``) raises the same error,
    for the first (row, position) recorded by any call since the last check (a forward's before an
    adjoint's), then clears the record. Meanwhile the bad value shows as NaN or inf in its own
    row's outputs only: a row start discards the state before it exactly.

Under CUDA-graph capture ``"sync"`` cannot synchronise and acts as ``"deferred"``.

CUDA graphs: the per-call buffers are allocated in the calling stream (the graph's pool under
capture); the gain table of a new ``(q, r, p0)`` or capacity and the deferred record of a new
device are created on first use, so run the op once before capturing (the usual warm-up).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import struct
import sys
from types import ModuleType
from typing import NamedTuple

import torch

from ..params import FilterParams
from . import register
from ._device_gains import gain_table
from ._rows import Rows

#: Whether triton is installed (it is imported only when a kernel is first defined, so that
#: registering this backend costs no import of triton).
HAVE_TRITON = importlib.util.find_spec("triton") is not None

#: Whether these kernels are validated on GPU hardware: ``kpo doctor`` and tests/test_cuda.py
#: passed on a real CUDA device and that evidence (device, driver, torch and triton versions, the
#: doctor's JSON, the tests' summary, benches/gpu.py's table) is committed in docs/gpu.md. Until
#: then ``backend="auto"`` picks the torch scan on CUDA, and ``backend="triton"`` (opt-in) warns
#: once per process. Set it to True in the commit that adds that evidence, and only then.
TRITON_VALIDATED = False

__all__ = ["CHECKS", "adjoint", "available", "forward", "raise_if_non_finite"]

#: The ``check`` policies (see the module docstring).
CHECKS = ("sync", "deferred")
DEFAULT_CHECK = "deferred"
#: Tile size override (tokens per program, a power of two); None: chosen from the shape.
TILE: int | None = None
#: Test-only: which tiles publish their inclusive value (state, and count under ``"hold"``) after
#: their look-back. 1 (the default): every tile; 0: none (only tiles holding a reset, which
#: publish it at once); ``k > 1``: tiles ``j % k == 0``. Results are bitwise the same for every
#: setting; holding inclusives back makes later tiles walk back over aggregates and compose them
#: under triton's interpreter, which runs programs one after another.
PUBLISH_EVERY: int = 1
#: Flags the look-back polls per round trip (a power of two; the kernels' ``WINDOW``; 32 made
#: ptxas spill 8 bytes in the packed masked forward at sm_90a, 16 does not). Results are bitwise
#: the same for every window (the maps are still applied one by one in time order); the tests
#: set small windows so that walks cross several.
LOOK_BACK_WINDOW: int = 16

#: One program per row (:func:`~kpo_rs.backends._triton_kernels.forward_row_kernel`: the row's
#: tiles in order, the carry in registers, no look-back) instead of one per tile. None (the
#: default): chosen by :func:`_per_row` (CUDA only); True/False force either path (tests, and
#: CPU runs under the interpreter). Results are bitwise the same either way.
PER_ROW: bool | None = None

_CODE_BASE = 1 << 62
_MAX_TOKENS = (1 << 31) - (1 << 16)
_NAMES = ("values", "grad")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def available(device: torch.device) -> bool:
    """Whether this backend runs on ``device``: triton importable and ``device`` a CUDA device
    torch can use, or the CPU under ``TRITON_INTERPRET=1``."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


@functools.cache
def _kernels(interpreted: bool) -> ModuleType:
    """The kernel module, run by triton's interpreter (CPU tensors) or compiled (CUDA). Triton
    decides this when a kernel is defined, from ``TRITON_INTERPRET``, so each kind is a copy of
    :mod:`kpo_rs.backends._triton_kernels` defined with that variable set accordingly."""
    kind = "interpreted" if interpreted else "compiled"
    name = f"{__package__}._triton_kernels_{kind}"
    path = os.path.join(os.path.dirname(__file__), "_triton_kernels.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a file path always has a loader
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpreted else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    sys.modules[name] = module
    return module


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Tokens per program of the large tiles (:func:`_launch`), and their warp count.
LARGE_TILE, LARGE_WARPS = 2048, 8
#: Registers per thread every program may use (``maxnreg``; see :func:`_options`).
MAX_REGISTERS = 128


def _warps(bt: int, dtype: torch.dtype) -> int:
    """The warp count of ``bt``-token programs: 8 tokens per thread in float32, 4 in float64
    (8 float64 tokens a thread put the unmasked float64 forward at 152-154 registers, or 24
    spilled bytes when held to :data:`MAX_REGISTERS`; at 4 every float64 look-back variant needs
    at most 114, sm_90a), from 1 to :data:`LARGE_WARPS` warps."""
    per_thread = 4 if dtype == torch.float64 else 8
    return max(1, min(LARGE_WARPS, bt // (32 * per_thread)))


def _launch(total: int, longest: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """``(BT, num_warps)`` for ``total`` tokens whose longest row has ``longest`` tokens
    (``total`` when not known), in ``dtype``.

    1024-token tiles where the grid still covers every multiprocessor twice, halved down to 256
    tokens for smaller inputs; the warps are :func:`_warps`' (8 tokens a thread in float32: 4
    warps at 1024 tokens; 4 in float64: 8 warps). Registers, not tile size, bound the tokens in
    flight per multiprocessor (about 4096 float32 tokens at about 110 registers a thread, from
    ptxas for sm_90); 4-warp programs let four tiles per multiprocessor overlap one's loads with
    another's scan.

    Few long rows: :data:`LARGE_TILE` (2048) tokens with :data:`LARGE_WARPS` (8) warps, still 8
    tokens per thread, when all of these hold: CUDA, float32, the rows do not fill the device
    (not :func:`_rows_fill`, so the look-back path runs unless :data:`PER_ROW` forces the other),
    and the grid of 2048-token tiles still covers every multiprocessor twice
    (``total >= 2048 * 2 * SMs``; with the rows not filling the device this also makes the
    longest row longer than two such tiles). Then each row is a chain of tiles
    whose look-backs walk back and compose maps one tile at a time; halving the tiles per row
    halves that chain, with the same tokens in flight (two 256-thread programs per
    multiprocessor at up to :data:`MAX_REGISTERS` registers instead of four of 128 threads).
    Not for float64: at 2048 tokens and 8 warps ptxas needs up to 172 registers (sm_90a), or
    spills up to 28 bytes when held to 128; 16 warps would fit but leave one program per
    multiprocessor. Not 4096 tokens: at 8 warps (16 tokens per thread) ptxas needs up to 188
    (float32) registers and spills. The choice does not depend on :data:`PER_ROW`, so both
    paths run the same tiles and agree bitwise (the float32 per-row kernels fit 2048-token,
    8-warp programs too).

    The tile size changes the order of the in-tile scan's combinations, so results of
    different tile sizes differ in rounding (each within :func:`kpo_rs.testing.tolerance`'s
    bound); for one tile size the two paths agree bitwise. :data:`TILE` overrides the tile,
    with the warps of a 1024-token tile or of the tile if larger."""
    if TILE is not None:
        return TILE, _warps(max(TILE, 1024), dtype)
    if device.type != "cuda":
        return 256, 4
    bt, target = 1024, 2 * _multiprocessors(device)
    while bt > 256 and total < bt * target:
        bt //= 2
    if (
        bt == 1024
        and dtype == torch.float32
        and total >= LARGE_TILE * target
        and not _rows_fill(total, longest, device)
    ):
        return LARGE_TILE, LARGE_WARPS
    return bt, _warps(bt, dtype)


def _rows_fill(total: int, longest: int, device: torch.device) -> bool:
    """Whether the rows alone fill the CUDA device: the longest row no longer than one
    multiprocessor's share of the tokens (``longest * SMs <= total``; padded: the rows at least
    as many as the multiprocessors)."""
    return longest * _multiprocessors(device) <= total


def _per_row(total: int, longest: int, device: torch.device) -> bool:
    """Whether the forward runs one program per row: on CUDA when the rows alone fill the device
    (:func:`_rows_fill`). Then no program walks much longer than the average, so the
    look-back's flags, polls and workspace buy nothing. A packed batch whose longest row is not
    known (device ``cu_seqlens``, no ``rows.longest``) keeps the look-back. :data:`PER_ROW`
    overrides."""
    if PER_ROW is not None:
        return PER_ROW
    if device.type != "cuda":
        return False
    return _rows_fill(total, longest, device)


def _options(device: torch.device, warps: int) -> dict:
    """Launch options: the warp count, fused multiply-adds (one rounding per ``a x + b``; named,
    so that triton's changing default does not change results), and at most
    :data:`MAX_REGISTERS` registers a thread (``maxnreg``), the budget the tile sizes assume.
    Left to itself ptxas holds some programs below it and spills (sm_90a): the 8-warp packed
    masked forward (``masked="hold"``) at 80 registers with 12 spilled bytes (95 and none at the
    budget), the 4-warp padded masked forward with a per-row ``m0`` at 72 with 4 bytes (80 and
    none)."""
    if device.type != "cuda":
        return {"num_warps": warps}
    return {"num_warps": warps, "enable_fp_fusion": True, "maxnreg": MAX_REGISTERS}


# --------------------------------------------------------------------------------------------
# Non-finite records


_deferred: dict[torch.device, torch.Tensor] = {}


def _deferred_record(device: torch.device) -> torch.Tensor:
    """The per-device record of the deferred check: int64 ``[4]`` (values in, values out, grad
    in, grad out)."""
    record = _deferred.get(device)
    if record is None:
        record = _deferred[device] = torch.zeros(4, dtype=torch.int64, device=device)
    return record


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _error(codes: list[int], name: str) -> ValueError | None:
    found, overflow = codes
    if found:
        code = _CODE_BASE - found
        return ValueError(
            f"{name}: non-finite value at row {code >> 31}, position {code & 0x7FFFFFFF}"
        )
    if overflow:
        return ValueError(f"{name}: the result overflowed although every input is finite")
    return None


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>`` (the key tensors' devices have)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def raise_if_non_finite(device: torch.device | str | None = None) -> None:
    """Raises the ValueError of the first non-finite value read by a deferred-check call since
    the last check (on ``device``, or on every device used), and clears the record. One host
    synchronisation per device; a no-op where nothing was recorded."""
    devices = list(_deferred) if device is None else [_indexed(torch.device(device))]
    for dev in devices:
        record = _deferred.get(dev)
        if record is None:
            continue
        codes = record.tolist()
        if any(codes):
            record.zero_()
            for slot, name in enumerate(_NAMES):
                err = _error(codes[2 * slot : 2 * slot + 2], name)
                if err is not None:
                    raise err


def _status(check: str, ws: torch.Tensor, device: torch.device, slot: int) -> tuple:
    """Where the kernel records non-finite values, and whether to read it after the launch."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if check == "sync" and not _capturing(device):
        return ws[:2], True
    return _deferred_record(device)[2 * slot : 2 * slot + 2], False


def _report(status: torch.Tensor, name: str) -> None:
    err = _error(status.tolist(), name)
    if err is not None:
        raise err


# --------------------------------------------------------------------------------------------
# Layout


def _dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 for the triton backend, got {t.dtype}")


def _layout(values: torch.Tensor, cu_seqlens: torch.Tensor | None, name: str, longest: int | None):
    """``(total, n_rows, row_len, cu, longest)`` of either layout, without reading device
    memory: a packed batch's longest row, unless given, is read when ``cu_seqlens`` is on the
    CPU, else bounded by the token count (the gain table then covers the whole batch)."""
    if cu_seqlens is None:
        if values.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, time], got shape {tuple(values.shape)}")
        n_rows, row_len = values.shape
        return n_rows * row_len, n_rows, row_len, values, row_len
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D [total], got shape {tuple(values.shape)}")
    total, n_rows = values.shape[0], cu_seqlens.shape[0] - 1
    if longest is None:
        on_host = cu_seqlens.device.type == "cpu"
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if on_host and n_rows else total
    cu = cu_seqlens.to(values.device, non_blocking=True).contiguous()
    return total, n_rows, 0, cu, longest


def _check_size(total: int, name: str) -> None:
    if total > _MAX_TOKENS:
        raise ValueError(
            f"{name}: {total} tokens; the triton backend takes at most {_MAX_TOKENS} per call"
        )


def _m0_args(m0: float | torch.Tensor, values: torch.Tensor, n_rows: int):
    """``(m0_bits, m0_tensor, stride, M0_PTR)``: a float travels as its float64 bits (no device
    copy); a tensor ``()`` or ``[batch]`` is read in the kernel."""
    if isinstance(m0, torch.Tensor):
        if m0.dim() > 1 or (m0.dim() == 1 and m0.shape[0] != n_rows):
            raise ValueError(
                f"m0 must be a scalar or one value per row ({n_rows}), got shape {tuple(m0.shape)}"
            )
        t = m0.detach().to(dtype=values.dtype, device=values.device).contiguous()
        return 0, t, (1 if t.dim() == 1 else 0), True
    bits = struct.unpack("<q", struct.pack("<d", float(m0)))[0]
    return bits, values, 0, False


def _tables(longest: int, params: FilterParams, like: torch.Tensor):
    return gain_table(max(longest, 1), params, like.device).tables(like.dtype)


# --------------------------------------------------------------------------------------------
# Entry points


class _Call(NamedTuple):
    """One call's tensors and launch shape: ``x`` the contiguous values (or gradient), ``mask``
    contiguous or None, ``cu`` the device offsets (``x`` itself in the padded layout, unread),
    ``row_len`` the padded row length (0 when packed), ``bt``/``warps``/``tiles`` the grid."""

    x: torch.Tensor
    mask: torch.Tensor | None
    cu: torch.Tensor
    total: int
    n_rows: int
    row_len: int
    longest: int
    packed: bool
    hold: bool
    bt: int
    warps: int
    tiles: int

    @property
    def mask_arg(self) -> torch.Tensor:
        """The mask pointer argument (``x`` stands in, unread, when there is no mask)."""
        return self.x if self.mask is None else self.mask

    @property
    def steps(self) -> int:
        """Steps of the kernels' binary search for the rows of a tile's first and last positions."""
        return max(self.n_rows - 1, 0).bit_length()

    def empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device=self.x.device)

    def options(self) -> dict:
        return _options(self.x.device, self.warps)


def _call(rows: Rows, name: str) -> _Call:
    _dtype(name, rows.values)
    total, n_rows, row_len, cu, longest = _layout(rows.values, rows.cu_seqlens, name, rows.longest)
    _check_size(total, name)
    x = rows.values.contiguous()
    mask = None if rows.mask is None else rows.mask.contiguous()
    bt, warps = _launch(total, longest, x.dtype, x.device)
    return _Call(
        x, mask, cu, total, n_rows, row_len, longest, rows.packed,
        rows.params.masked == "hold", bt, warps, -(-total // bt),
    )  # fmt: skip


def forward(rows: Rows, m0: float | torch.Tensor, *, check: str = DEFAULT_CHECK) -> torch.Tensor:
    """The filtered values: same shape and dtype as ``rows.values`` (float32 or float64, either
    layout), contiguous. ``m0``: a float, or a tensor ``()`` or ``[batch]`` (per-row prior
    means). ``check``: see the module docstring. Without ``rows.longest`` a device
    ``cu_seqlens`` is not read and the gain table covers the whole batch."""
    c = _call(rows, "values")
    out = torch.empty_like(c.x)
    if c.total == 0:
        return out
    m0_bits, m0_t, m0_stride, m0_ptr = _m0_args(m0, c.x, c.n_rows)
    k_tab, a_tab = _tables(c.longest, rows.params, c.x)
    count = c.hold and c.mask is not None
    kernels = _kernels(c.x.device.type != "cuda")
    if _per_row(c.total, c.longest, c.x.device):
        ws = torch.zeros(2, dtype=torch.int64, device=c.x.device)  # status[2] only
        status, sync = _status(check, ws, c.x.device, 0)
        kernels.forward_row_kernel[(c.n_rows,)](
            c.x, c.mask_arg, out, c.cu, m0_t, k_tab, a_tab, status,
            c.total, c.n_rows, c.row_len, c.steps, m0_bits, m0_stride,
            BT=c.bt, PACKED=c.packed, HAS_MASK=c.mask is not None, HOLD=c.hold, M0_PTR=m0_ptr,
            **c.options(),
        )  # fmt: skip
        if sync:
            _report(status, "values")
        return out
    # [status[2], ticket, state flags[tiles], count flags[tiles] (counts only)]
    ws = torch.zeros(3 + c.tiles * (2 if count else 1), dtype=torch.int64, device=c.x.device)
    status, sync = _status(check, ws, c.x.device, 0)
    cnt = c.empty(2 * c.tiles if count else 1, torch.int32)
    kernels.forward_kernel[(c.tiles,)](
        c.x, c.mask_arg, out, c.cu, m0_t, k_tab, a_tab, ws[2:], status, cnt,
        c.empty(3 * c.tiles, c.x.dtype),
        c.total, c.tiles, c.n_rows, c.row_len, c.steps, m0_bits, m0_stride,
        BT=c.bt, PACKED=c.packed, HAS_MASK=c.mask is not None, HOLD=c.hold, M0_PTR=m0_ptr,
        PUBLISH=PUBLISH_EVERY, WINDOW=LOOK_BACK_WINDOW, **c.options(),
    )  # fmt: skip
    if sync:
        _report(status, "values")
    return out


def adjoint(rows: Rows, *, check: str = DEFAULT_CHECK) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product for the upstream gradient ``rows.values``: ``(d values``
    shaped like it, ``d m0`` ``[batch])``, float32 or float64 like it. ``check`` as for
    :func:`forward`."""
    c = _call(rows, "grad")
    dz = torch.empty_like(c.x)
    dm0 = torch.zeros(c.n_rows, dtype=c.x.dtype, device=c.x.device)
    if c.total == 0:
        return dz, dm0
    k_tab, a_tab = _tables(c.longest, rows.params, c.x)
    count = c.hold and c.mask is not None
    kernels = _kernels(c.x.device.type != "cuda")
    if _per_row(c.total, c.longest, c.x.device):
        ws = torch.zeros(2, dtype=torch.int64, device=c.x.device)  # status[2] only
        status, sync = _status(check, ws, c.x.device, 1)
        kernels.adjoint_row_kernel[(c.n_rows,)](
            c.x, c.mask_arg, dz, dm0, c.cu, k_tab, a_tab, status,
            c.total, c.n_rows, c.row_len, c.steps,
            BT=c.bt, PACKED=c.packed, HAS_MASK=c.mask is not None, HOLD=c.hold, **c.options(),
        )  # fmt: skip
        if sync:
            _report(status, "grad")
        return dz, dm0
    ws = torch.zeros(
        3 + c.tiles + (1 + c.tiles if count else 0), dtype=torch.int64, device=c.x.device
    )
    status, sync = _status(check, ws, c.x.device, 1)
    cin = c.empty(c.tiles if count else 1, torch.int32)
    if count:
        kernels.count_kernel[(c.tiles,)](
            c.mask_arg, c.cu, cin, ws[3 + c.tiles :], c.empty(2 * c.tiles, torch.int32),
            c.total, c.tiles, c.n_rows, c.row_len, c.steps,
            BT=c.bt, PACKED=c.packed, PUBLISH=PUBLISH_EVERY, WINDOW=LOOK_BACK_WINDOW, **c.options(),
        )  # fmt: skip
    kernels.adjoint_kernel[(c.tiles,)](
        c.x, c.mask_arg, dz, dm0, c.cu, k_tab, a_tab, cin, ws[2 : 3 + c.tiles], status,
        c.empty(3 * c.tiles, c.x.dtype),
        c.total, c.tiles, c.n_rows, c.row_len, c.steps,
        BT=c.bt, PACKED=c.packed, HAS_MASK=c.mask is not None, HOLD=c.hold,
        PUBLISH=PUBLISH_EVERY, WINDOW=LOOK_BACK_WINDOW, **c.options(),
    )  # fmt: skip
    if sync:
        _report(status, "grad")
    return dz, dm0


def _why_not(device: torch.device) -> str:
    """Why this backend cannot run on ``device`` (the install hint only where triton is missing)."""
    if not HAVE_TRITON:
        return "it needs triton (pip install triton) and CUDA tensors"
    if device.type == "cpu":
        return "it needs CUDA tensors (on the CPU it runs only under TRITON_INTERPRET=1)"
    if device.type == "cuda":
        return "torch cannot use a CUDA device here"
    return "it needs CUDA tensors"


register(
    "triton",
    forward=forward,
    adjoint=adjoint,
    available=available,
    needs="CUDA tensors and triton (CPU under TRITON_INTERPRET=1)",
    auto={"cuda": 3} if TRITON_VALIDATED else {},
    checks=CHECKS,
    raise_deferred=raise_if_non_finite,
    why_not=_why_not,
    warning=None
    if TRITON_VALIDATED
    else (
        "backend='triton' is not yet validated on GPU hardware (no device run is recorded in "
        "docs/gpu.md); backend='auto' uses the torch scan on CUDA"
    ),
)
