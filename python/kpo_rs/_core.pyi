"""Type stub of the native module ``kpo_rs._core`` (Rust, PyO3 + rust-numpy).

Every function releases the GIL while its kernel runs, returns new arrays and never writes its
inputs. Errors: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, offsets,
parameter or a non-finite value at a position the filter reads; each message names the argument.
Parameters have no defaults here; ``kpo_rs`` supplies them.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "adjoint",
    "check_offsets",
    "filter",
    "gains",
    "innovations",
    "premise",
]

__version__: str

_Float = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Offsets = npt.NDArray[np.int32] | npt.NDArray[np.int64]
_Masked = Literal["hold", "zero"]

def gains(n: int, q: float, r: float, p0: float) -> npt.NDArray[np.float64]:
    """Gains ``K_0 .. K_{n-1}``, float64 ``[n]``."""

def filter(
    values: _Float,
    cu_seqlens: _Offsets | None,
    mask: npt.NDArray[np.bool_] | None,
    variances: tuple[float, float, float],
    m0: float,
    masked: _Masked,
) -> _Float:
    """Filters the rows of ``values`` float32/float64: padded ``[batch, time]`` when
    ``cu_seqlens`` is None, else packed ``[total]`` split by ``cu_seqlens`` ``[batch + 1]``;
    ``mask`` bool shaped like ``values``; ``variances`` ``(q, r, p0)``. Returns the filtered
    values, shaped like ``values`` and in its dtype."""

def adjoint(
    grad: _Float,
    cu_seqlens: _Offsets | None,
    mask: npt.NDArray[np.bool_] | None,
    variances: tuple[float, float, float],
    masked: _Masked,
) -> tuple[_Float, _Float]:
    """Adjoint of :func:`filter` for ``grad`` (either layout): ``(dvalues`` shaped like
    ``grad``, ``dm0 [batch])``."""

def check_offsets(cu_seqlens: _Offsets, total: int) -> int:
    """Checks ``cu_seqlens`` against ``total`` values; returns the longest segment's length."""

def innovations(
    values: _Float,
    cu_seqlens: _Offsets | None,
    mask: npt.NDArray[np.bool_] | None,
    variances: tuple[float, float, float],
    m0: float,
) -> npt.NDArray[np.float64]:
    """The sums of each row's innovations under the filter's model (either layout; masked
    positions skipped as ``masked="hold"`` skips them; accumulated in float64): float64
    ``[batch, 7]`` with columns ``log_likelihood, tokens, terms, log_det, ssq, cross, c2``."""

def premise(
    series: Sequence[_Float],
    lags: Sequence[Sequence[int]],
    cu_seqlens: _Offsets | None,
    mask: npt.NDArray[np.bool_] | None,
    clip: tuple[_Float, _Float, npt.NDArray[np.bool_]] | None,
) -> npt.NDArray[np.float64]:
    """The premise metrics' statistics (``kpo_rs.premise``; accumulated in float64, rows in
    parallel) of ``series`` (one dtype, float32/float64, one layout: padded ``[batch, time]``, or
    packed ``[total]`` split by ``cu_seqlens``), over the tokens where ``mask`` (bool, like the
    series; None: all) is True, holes skipped; ``lags[i]`` (each >= 1) are the lags of
    ``series[i]``'s autocorrelations; ``clip = (advantages, rt, clipped)`` (``advantages`` like the
    series or, padded, ``[batch, 1]``; ``clipped`` bool) adds the clip's removed shares. Returns
    float64: per series ``mean, std, acf at each lag``, then ``share_pos, share_neg`` with a
    clip."""
