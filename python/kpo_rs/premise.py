"""The filter's premise measured on a training batch: :func:`premise_metrics`.

KPO rests on one premise: the per-token log-ratio ``z = logp - old_logp`` has a slowly varying
part worth tracking along the response, under token noise. These statistics say, per step and
over the valid tokens, whether that holds on a run and whether the configured filter acts on it.
They are computed on the tensors' device with no host synchronisation of their own (no
``.item()``, no Python branch on a tensor's value): the stacks synchronise when they log. On a GPU
(any device but the CPU) that is a handful of torch reductions (:func:`series_statistics`,
:func:`clip_shares`); for CPU tensors of float32 or float64 it is one pass per row of the Rust core
(``kpo_rs._core.premise``, rows in parallel, zero-copy through numpy), which accumulates in
float64: the same definitions, good to a few ``n * 2^-53`` of the spread whatever the offset
(the torch path's sums are in the input's dtype, see :func:`series_statistics`).

Definitions (``n``: valid tokens of the batch; a row's valid tokens are numbered in order,
holes skipped as the filter skips them under ``masked="hold"``, so consecutive *valid* tokens are
neighbours):

- ``kpo_log_ratio_mean``: ``m = sum z / n`` (nats), the offset a log-space filter keeps;
- ``kpo_log_ratio_std``: ``s = sqrt(sum (z - m)^2 / n)`` (population standard deviation);
- ``kpo_log_ratio_acf<k>`` for ``k`` in :data:`ACF_LAGS`: the autocorrelation at lag ``k``
  pooled over the batch, ``(sum_pairs (z_i - m)(z_j - m) / P_k) / s^2``, the pairs being the
  valid tokens ``i`` and ``j`` of one row that are ``k`` valid tokens apart and ``P_k`` their
  number (``sum_rows max(n_row - k, 0)``). Centred on the batch mean, so a per-row offset counts
  as a slow component (the filter would track it); 0 when there is no pair or no spread;
- ``kpo_filtered_var_ratio``: the filtered log-ratio's variance over the raw one's (each about its
  own mean over the valid tokens): near 1 the filter passes the tokens' noise through, near 0 it
  keeps only a level;
- ``kpo_clip_share_pos`` / ``kpo_clip_share_neg``: of the tokens with a positive (negative)
  advantage, the share of the gradient magnitude ``|A| * rt`` that the clip removes (the tokens
  where the clipped objective is the active one); 0 without a clip;
- ``kpo_mismatch_mean`` / ``_std`` / ``_acf1`` (only when the engine's log-probs are given): the
  same statistics of the trainer-vs-engine mismatch ``d = old_logp - engine_logp`` (nats), the
  trainer's log-prob of the sampled token under the behaviour policy minus the inference
  engine's for the same token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import _core

__all__ = ["ACF_LAGS", "PREMISE_METRICS", "clip_shares", "premise_metrics", "series_statistics"]

#: The lags of the autocorrelation the losses log (``kpo_log_ratio_acf1``, ``_acf2``, ...).
ACF_LAGS = (1, 2, 4, 8)

#: The metric names :func:`premise_metrics` returns (the ``kpo_mismatch_*`` ones only with the
#: engine's log-probs).
PREMISE_METRICS = (
    "kpo_log_ratio_mean",
    "kpo_log_ratio_std",
    *(f"kpo_log_ratio_acf{k}" for k in ACF_LAGS),
    "kpo_filtered_var_ratio",
    "kpo_clip_share_pos",
    "kpo_clip_share_neg",
    "kpo_mismatch_mean",
    "kpo_mismatch_std",
    "kpo_mismatch_acf1",
)

_TINY = 1e-30


def series_statistics(
    values: Sequence[torch.Tensor] | torch.Tensor,
    mask: torch.Tensor,
    lags: tuple[int, ...] = ACF_LAGS,
) -> torch.Tensor:
    """Mean, standard deviation and pooled autocorrelations of each of ``k`` series.

    Args:
        values: ``k`` float tensors ``[batch, time]`` (or one ``[k, batch, time]``) sharing one
            mask and dtype; values at masked positions are ignored, whatever they are (NaN too).
        mask: ``[batch, time]`` bool, True at valid tokens.
        lags: positive lags, in valid tokens.

    Returns:
        ``[k, 2 + len(lags)]`` in ``values``' dtype and device: mean, std, then the
        autocorrelation at each lag (the module's definitions).

    How (a dozen passes over the batch, most of them dot products): each row's valid tokens
    are moved to its front (a scatter by the count of valid tokens so far) in a buffer with
    ``max(lags) + 1`` zero columns after each row, so that one flat dot product ``f[k:] . f[:-k]``
    sums every lag-``k`` pair of a row and no pair across rows. The sums are raw; centring on the
    mean is applied to them in closed form, with the pairs' first and second members' sums
    (the row sums less the last or first ``k`` valid tokens of each row). Precision: the sums
    are in the input's dtype, so a mean ``m`` far from 0 against the spread ``s`` costs about
    ``(m / s)^2`` ulps of the variance and autocorrelations (float32: ``m / s = 50`` leaves them
    good to about 1e-3; the log-ratios and mismatches of a run have ``m / s`` near or below 1).
    """
    series = list(values)
    batch, length = mask.shape
    dtype, device = series[0].dtype, series[0].device
    gap = (max(lags) if lags else 0) + 1
    width = length + gap
    # int32 counts: on CPU an int64 cumsum and where cost ten times as much (a row is < 2^31)
    count = torch.cumsum(mask, dim=-1, dtype=torch.int32)
    n_row = count[:, -1:]  # [batch, 1]
    n = n_row.sum().to(dtype).clamp(min=1)
    slot = torch.where(mask, count - 1, width - 1).long()  # masked values: the last column
    front = torch.zeros(len(series), batch, width, dtype=dtype, device=device)
    for i, v in enumerate(series):
        front[i].scatter_(-1, slot, v)
    front[..., -1] = 0.0  # what the masked positions held (NaN included) is dropped here
    flat = front.reshape(len(series), -1)
    total = flat.sum(dim=-1)  # [k]
    square = torch.stack([f @ f for f in flat])
    mean = total / n
    var = (square / n - mean * mean).clamp(min=0.0)
    out = [mean, var.sqrt()]
    if not lags:
        return torch.stack(out, dim=1)
    top = max(lags)
    picks = [lag - 1 for lag in lags]  # Python ints: column picks are views, no index tensor
    # pairs at lag k: valid tokens with k more before them in the row, sum_rows max(n_row - k, 0)
    in_row = torch.arange(top, device=device, dtype=torch.int32) < n_row  # [batch, top]
    before = in_row.sum(dim=0).cumsum(dim=0)  # [top]: tokens among each row's first j + 1
    pairs = n - torch.stack([before[c] for c in picks]).to(dtype)  # [L]
    # the last `top` valid tokens of each row (zero where the row is shorter)
    index = n_row - top + torch.arange(top, device=device, dtype=torch.int32)
    tail = front.gather(-1, index.clamp(min=0).long().expand(len(series), -1, -1))
    tail = torch.where(index >= 0, tail, 0.0).sum(dim=1)  # [k, top], by distance from the end
    tail_sums = tail.flip(-1).cumsum(dim=-1)  # [k, top]: sum of each row's last j + 1
    head_sums = front[..., :top].sum(dim=1).cumsum(dim=-1)  # [k, top]: of the first j + 1
    firsts = total[:, None] - torch.stack([tail_sums[:, c] for c in picks], 1)  # k more after
    seconds = total[:, None] - torch.stack([head_sums[:, c] for c in picks], 1)  # k more before
    products = torch.stack([torch.stack([f[lag:] @ f[:-lag] for lag in lags]) for f in flat])
    m = mean[:, None]
    cov = (products - m * (firsts + seconds)) / pairs.clamp(min=1) + m * m
    cov = torch.where(pairs > 0, cov, 0.0)
    acf = cov / var.clamp(min=_TINY)[:, None]  # [k, L]
    return torch.cat([torch.stack(out, dim=1), acf], dim=1)


def clip_shares(
    advantages: torch.Tensor, rt: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)``: of the valid tokens with a positive (negative) advantage, the
    share of the gradient magnitude ``|A| * rt`` where ``clipped`` (bool ``[batch, time]``, the
    clip active) removes it; 0-d tensors, 0 where no token has that sign."""
    # with g = A * rt (rt > 0): the positive side sums (|g| + g) / 2, the negative (|g| - g) / 2
    g = torch.where(mask, advantages * rt, 0.0)
    removed = torch.where(clipped, g, 0.0)
    sums = torch.stack((g.abs().sum(), g.sum(), removed.abs().sum(), removed.sum()))
    total = torch.stack((sums[0] + sums[1], sums[0] - sums[1])) / 2
    cut = torch.stack((sums[2] + sums[3], sums[2] - sums[3])) / 2
    shares = cut / total.clamp(min=_TINY)
    return shares[0], shares[1]


def premise_metrics(
    z: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    advantages: torch.Tensor | None = None,
    rt: torch.Tensor | None = None,
    clipped: torch.Tensor | None = None,
    mismatch: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The premise metrics of one batch (names: :data:`PREMISE_METRICS`), 0-d tensors on ``z``'s
    device in ``z``'s dtype.

    Args:
        z: ``[batch, time]`` raw log-ratio ``logp - old_logp`` (nats), detached.
        x: ``[batch, time]`` filtered log-ratio (nats), detached.
        mask: ``[batch, time]`` bool valid tokens.
        advantages, rt, clipped: ``[batch, time]`` advantages, the (filtered) ratio the loss
            uses and where its clip is active (bool); all three or none (no clip shares then).
        mismatch: ``[batch, time]`` ``old_logp - engine_logp`` (nats), or None.
    """
    mask = mask.bool()
    clip = None
    if advantages is not None and rt is not None and clipped is not None:
        clip = (advantages, rt, clipped)
    host = _host_metrics(z, x, mask, clip, mismatch)
    return host if host is not None else _device_metrics(z, x, mask, clip, mismatch)


def _device_metrics(
    z: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    clip: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    mismatch: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """:func:`premise_metrics` by torch reductions on the tensors' device (``mask`` bool)."""
    series = [z] if mismatch is None else [z, mismatch.to(z.dtype)]
    stats = series_statistics(series, mask)
    out: dict[str, torch.Tensor] = {
        "kpo_log_ratio_mean": stats[0, 0],
        "kpo_log_ratio_std": stats[0, 1],
    }
    for i, lag in enumerate(ACF_LAGS):
        out[f"kpo_log_ratio_acf{lag}"] = stats[0, 2 + i]
    # the filtered log-ratio's variance (about its own mean) over the raw one's: two flat sums
    kept = torch.where(mask, x.to(z.dtype), 0.0).reshape(-1)
    n = mask.sum().to(z.dtype).clamp(min=1)
    x_mean = kept.sum() / n
    x_var = (kept @ kept / n - x_mean * x_mean).clamp(min=0.0)
    out["kpo_filtered_var_ratio"] = x_var / stats[0, 1].square().clamp(min=_TINY)
    if clip is not None:
        out["kpo_clip_share_pos"], out["kpo_clip_share_neg"] = clip_shares(*clip, mask)
    if mismatch is not None:
        out["kpo_mismatch_mean"] = stats[1, 0]
        out["kpo_mismatch_std"] = stats[1, 1]
        out["kpo_mismatch_acf1"] = stats[1, 2]
    return out


def _host_metrics(
    z: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    clip: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    mismatch: torch.Tensor | None,
) -> dict[str, torch.Tensor] | None:
    """:func:`premise_metrics` by the Rust core's one pass per row, for CPU tensors of float32
    or float64 ``[batch, time]`` (``mask`` bool); None where that does not apply (another
    device or dtype, or shapes that only broadcast), for the torch path to take."""
    dtype, shape = z.dtype, z.shape
    if z.device.type != "cpu" or dtype not in (torch.float32, torch.float64) or z.dim() != 2:
        return None
    tensors = [x, mask] + ([] if mismatch is None else [mismatch])
    tensors += [] if clip is None else list(clip)
    if any(t.device.type != "cpu" or t.shape != shape for t in tensors):
        return None

    def host(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(dtype).numpy()  # a view: no copy of a tensor already in dtype

    series = [host(z), host(x)] + ([] if mismatch is None else [host(mismatch)])
    lags: list[tuple[int, ...]] = [ACF_LAGS, ()] + ([] if mismatch is None else [(1,)])
    arrays = None
    if clip is not None:
        advantages, rt, clipped = clip
        if advantages.stride(-1) == 0:  # one advantage per row, broadcast along the response
            advantages = advantages[:, :1]
        arrays = (host(advantages), host(rt), clipped.detach().bool().numpy())
    flat = _core.premise(series, lags, None, mask.detach().numpy(), arrays).tolist()
    z_mean, z_std, *acf = flat[: 2 + len(ACF_LAGS)]
    x_std = flat[3 + len(ACF_LAGS)]
    rest = flat[4 + len(ACF_LAGS) :]
    values = {"kpo_log_ratio_mean": z_mean, "kpo_log_ratio_std": z_std}
    values.update({f"kpo_log_ratio_acf{lag}": a for lag, a in zip(ACF_LAGS, acf)})
    values["kpo_filtered_var_ratio"] = x_std * x_std / max(z_std * z_std, _TINY)
    if mismatch is not None:
        mismatch_stats, rest = rest[:3], rest[3:]
    if clip is not None:
        values["kpo_clip_share_pos"], values["kpo_clip_share_neg"] = rest
    if mismatch is not None:
        for name, v in zip(("mean", "std", "acf1"), mismatch_stats):
            values[f"kpo_mismatch_{name}"] = v
    # one tensor, then 0-d views of it (a tensor per value would cost a few microseconds each)
    out = torch.tensor(list(values.values()), dtype=dtype)
    return dict(zip(values, out.unbind()))
