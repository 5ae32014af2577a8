"""Type stub of the native module ``kpo_rs._core`` (Rust, PyO3 + rust-numpy).

Every function releases the GIL while its kernel runs, returns new arrays and never writes its
inputs. Errors: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, offsets,
parameter or a non-finite value at a position the filter reads; each message names the argument.
Parameters have no defaults here; ``kpo_rs`` supplies them.
"""

from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

_Float = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Offsets = npt.NDArray[np.int32] | npt.NDArray[np.int64]
_Masked = Literal["hold", "zero"]

def gains(n: int, q: float, r: float, p0: float) -> npt.NDArray[np.float64]:
    """Gains ``K_0 .. K_{n-1}``, float64 ``[n]``."""

def filter_padded(
    values: _Float,
    mask: npt.NDArray[np.bool_] | None,
    q: float,
    r: float,
    p0: float,
    m0: float,
    masked: _Masked,
) -> _Float:
    """``values`` ``[batch, time]`` float32/float64, ``mask`` ``[batch, time]`` bool -> filtered
    ``[batch, time]`` in the dtype of ``values``."""

def adjoint_padded(
    grad: _Float,
    mask: npt.NDArray[np.bool_] | None,
    q: float,
    r: float,
    p0: float,
    masked: _Masked,
) -> tuple[_Float, _Float]:
    """``grad`` ``[batch, time]`` -> ``(dvalues [batch, time], dm0 [batch])``."""

def filter_packed(
    values: _Float,
    cu_seqlens: _Offsets,
    mask: npt.NDArray[np.bool_] | None,
    q: float,
    r: float,
    p0: float,
    m0: float,
    masked: _Masked,
) -> _Float:
    """``values`` ``[total]``, ``cu_seqlens`` ``[batch + 1]`` -> filtered ``[total]``."""

def adjoint_packed(
    grad: _Float,
    cu_seqlens: _Offsets,
    mask: npt.NDArray[np.bool_] | None,
    q: float,
    r: float,
    p0: float,
    masked: _Masked,
) -> tuple[_Float, _Float]:
    """``grad`` ``[total]`` -> ``(dvalues [total], dm0 [batch])``."""

def check_offsets(cu_seqlens: _Offsets, total: int) -> int:
    """Checks ``cu_seqlens`` against ``total`` values; returns the longest segment's length."""
