"""Policy losses: KPO and KPO-clipped, the baselines they are judged against, and the peers.

Every loss takes verl's inputs, ``[batch, response_len]`` tensors ``old_log_prob``, ``log_prob``,
``advantages`` and ``response_mask`` (bool, or 0/1 numbers used as weights in the aggregation
like verl does), and returns ``(loss, metrics)``: a scalar tensor and a dict of detached scalar
tensors (no host synchronisation; call ``float()`` on them when logging).

Aggregation (``loss_agg_mode``, as verl): ``"token-mean"`` (mean over valid tokens),
``"token-sum"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` and
``"seq-mean-token-sum-norm"`` (token sums over the response length, or ``loss_scale_factor``).
``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``) normalises across data-parallel ranks exactly as verl does.

The package's modules, each with one job: :mod:`~kpo_rs.losses.kpo` (KPO),
:mod:`~kpo_rs.losses.baselines` (verl's losses), :mod:`~kpo_rs.losses.peers` (DPPO, MinPRO, BAPO),
:mod:`~kpo_rs.losses.table` (every loss by name with its authors' settings) and ``_common`` (what
they share). This module re-exports the losses; ``kpo_rs.peers`` and ``kpo_rs.loss_table`` remain
importable under their old names.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "kpo_rs.losses needs PyTorch: pip install 'kpo-rs[torch]' (or pip install torch)"
    ) from exc

from ._common import LOSS_AGG_MODES, agg_loss, switch_rate
from .baselines import gmpo_loss, gpg_loss, gspo_loss, ppo_clip_loss
from .kpo import GRADS, KPO_CLIP, kpo_clipped_loss, kpo_loss, kpo_token_losses

__all__ = [
    "GRADS",
    "KPO_CLIP",
    "LOSS_AGG_MODES",
    "agg_loss",
    "gmpo_loss",
    "gpg_loss",
    "gspo_loss",
    "kpo_clipped_loss",
    "kpo_loss",
    "kpo_token_losses",
    "ppo_clip_loss",
    "switch_rate",
]
