"""Filter settings fitted online, during training: :class:`FilterFitter` (``q="fit"`` in the KPO
losses, ``KPO_Q=fit`` in the plug-ins).

The losses are functions; what must survive from one step to the next (the smoothed settings, the
step count, whether a fallback was announced) lives in a small object that the caller holds and
passes in: ``kpo_loss(..., q="fit", fitter=fitter)``. The plug-ins hold one per process.

What it does, at every call (one call = one step unless the caller gives ``step``):

- every ``every`` steps (the first call included) it refits ``q`` and ``r`` by
  :func:`kpo_rs.fit.fit_filter` (maximum likelihood, ``p0`` and ``masked`` held at ``base``) on
  the batch's log-ratios. Only a subsample crosses to the host: at most ``max_rows`` rows, evenly
  spaced over the batch (rows ``floor(i * batch / max_rows)``), each cut to its first
  ``max_tokens // rows`` positions; the same batch always gives the same rows, hence the same
  fit. Other steps copy nothing. A batch with nothing to fit (no valid token, or every
  log-ratio equal, as on the first pass over a rollout batch, where ``logp == old_logp``) does
  not count as a refit: the next call tries again;
- it smooths across refits by an exponential moving average of ``log q`` and ``log r``:
  ``log q <- (1 - smoothing) * log q + smoothing * log q_fit`` (the first good fit is taken as
  it is), so one odd batch moves the settings by at most a factor ``(q_fit / q) ** smoothing``;
- a fit that is flat (no drift told from the data: its interval reaches ``q = 0``), not finite,
  with ``q`` or ``r`` not > 0, or that fails, is not used: the last good settings (else
  ``base``) stay, and a ``UserWarning`` says so once per fitter.

So the settings are always finite with ``q > 0`` and ``r > 0`` (``base`` must be too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .fit import fit_filter
from .params import FilterParams

__all__ = ["FIT", "FilterFitter"]

#: The value of ``q`` (``KPO_Q``) that asks for settings fitted online.
FIT = "fit"


@dataclass
class FilterFitter:
    """Online fit of the filter's ``q`` and ``r`` (see the module documentation).

    Attributes:
        base: the configured settings: the start, the fallback, and the ``p0`` / ``masked`` held.
        every: refit every this many steps (>= 1).
        smoothing: weight of a new fit in the moving average of ``log q`` and ``log r``, in
            ``(0, 1]`` (1: no smoothing).
        max_rows, max_tokens: the subsample copied to the host at a refit.
    """

    base: FilterParams = field(default_factory=FilterParams)
    every: int = 10
    smoothing: float = 0.5
    max_rows: int = 64
    max_tokens: int = 1 << 16
    params: FilterParams = field(init=False)
    steps: int = field(init=False, default=0)
    refits: int = field(init=False, default=0)
    last_refit_step: int | None = field(init=False, default=None)
    _good: bool = field(init=False, default=False)
    _warned: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not isinstance(self.base, FilterParams):
            raise TypeError(f"base must be a FilterParams, got {type(self.base).__name__}")
        if not (math.isfinite(self.base.q) and self.base.q > 0):
            raise ValueError(
                f"base: q must be a finite number > 0 to fall back on, got {self.base.q}"
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1, got {self.every!r}")
        if not (0.0 < self.smoothing <= 1.0):
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing!r}")
        for name in ("max_rows", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.params = self.base

    def _sample(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The subsample of rows and positions copied to the host (float64 values, bool mask)."""
        batch, length = z.shape
        rows = min(batch, self.max_rows)
        index = (torch.arange(rows, device=z.device) * batch) // rows
        width = max(1, min(length, self.max_tokens // rows))
        values = z.detach().index_select(0, index)[:, :width]
        valid = mask.index_select(0, index)[:, :width]
        return values.to("cpu", torch.float64).numpy(), valid.to("cpu").numpy()

    def _refit(self, z: torch.Tensor, mask: torch.Tensor) -> bool:
        """Refits on the batch; False when the batch has nothing to fit (no valid token, or every
        log-ratio equal, as on the first pass over a batch, where ``logp == old_logp``)."""
        values, valid = self._sample(z, mask)
        values = np.where(valid, values, 0.0)
        if not valid.any() or np.ptp(values[valid]) == 0.0:
            return False
        reason = None
        try:
            fit = fit_filter(values, valid, fit=("q", "r"), params=self.base.replace(m0=0.0))
            q, r = fit.params.q, fit.params.r
            if fit.flat:
                reason = "the fit is flat (no drift told from this batch)"
            elif not (math.isfinite(q) and math.isfinite(r) and q > 0 and r > 0):
                reason = f"the fit gave q={q:g} r={r:g}"
        except ValueError as exc:
            reason = f"the fit failed ({exc})"
        self.refits += 1
        if reason is not None:
            if not self._warned:
                self._warned = True
                kept = "the last good settings" if self._good else "the configured settings"
                warnings.warn(
                    f"kpo: q='fit': {reason}; keeping {kept} q={self.params.q:.4g} "
                    f"r={self.params.r:.4g} (said once)",
                    UserWarning,
                    stacklevel=4,
                )
            return True
        if self._good:
            a = self.smoothing
            q = math.exp((1 - a) * math.log(self.params.q) + a * math.log(q))
            r = math.exp((1 - a) * math.log(self.params.r) + a * math.log(r))
        self.params = self.base.replace(q=q, r=r)
        self._good = True
        return True

    def update(
        self, log_ratio: torch.Tensor, mask: torch.Tensor, step: int | None = None
    ) -> FilterParams:
        """The settings for this step: refitted on ``log_ratio`` (``[batch, time]``, nats;
        ``mask`` ``[batch, time]`` bool valid tokens) when the step is a refit step, else the
        current ones. ``step``: the trainer's optimizer step when the caller knows it (calls with
        the same step refit at most once); None counts calls."""
        if step is None:
            step = self.steps
            self.steps += 1
        due = self.last_refit_step is None or (
            step != self.last_refit_step and step - self.last_refit_step >= self.every
        )
        if due and self._refit(log_ratio, mask.bool()):
            self.last_refit_step = step
        return self.params
