"""The rows of one call, as every backend receives them (docs/design.md, "Backends")."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import _core
from ..params import FilterParams

__all__ = ["Rows"]

_AUTHORS = FilterParams()


class Rows(NamedTuple):
    """A batch of rows and the settings to filter them with (a named tuple: built on every call
    of the op, so it costs a tuple).

    Attributes:
        values: float32/float64, ``[batch, time]`` (padded) or ``[total]`` (packed, when
            ``cu_seqlens`` is given): the observations for the forward pass, the upstream
            gradient for the adjoint.
        cu_seqlens: None, or ``[batch + 1]`` int32/int64 offsets of the packed rows (validated by
            the caller: first 0, non-decreasing, last ``total``).
        mask: None, or bool shaped like ``values``, True at valid tokens.
        params: the settings (their ``m0`` is ignored: the prior mean travels apart so that a
            tensor can carry its gradient).
        longest: the longest packed row where the caller knows it (device backends size their
            gain tables with it instead of reading the offsets); None otherwise.
    """

    values: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    params: FilterParams = _AUTHORS
    longest: int | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def n_rows(self) -> int:
        """The number of rows."""
        return self.values.shape[0] if self.cu_seqlens is None else self.cu_seqlens.shape[0] - 1

    def replace(self, **changes: Any) -> Rows:
        return self._replace(**changes)

    def measured(self) -> Rows:
        """These rows with ``longest`` known where they are packed: unless the caller gave it, the
        offsets are checked on the host (a ValueError naming ``cu_seqlens`` when they do not fit
        the values) and the longest row read from them. Padded rows are returned as they are."""
        if self.cu_seqlens is None or self.longest is not None:
            return self
        offsets = self.cu_seqlens.detach().cpu().numpy()
        longest = _core.check_offsets(offsets, self.values.shape[0])
        return Rows(self.values, self.cu_seqlens, self.mask, self.params, longest)
