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
:mod:`~kpo_rs.losses.table` (every loss by name with its authors' settings), ``_registry`` (the
registry the table reads) and ``_common`` (what they share). This module exports the losses, the
table (``LOSSES``, ``LOSS_NAMES``, ``LossSpec``, ``get_loss``, ``check_names``) and the registry.

Adding a loss: write its function in the module of its family and put
``@register_loss(name, defaults=..., paper=..., description=..., stacks=...)`` on it (several
registrations of one function are allowed, as ``kpo`` and ``kpo_clipped``); the table, the demo,
the sweep and every plug-in whose stack is in ``stacks`` offer it by name, including one
registered at run time (``unregister_loss`` removes it).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "kpo_rs.losses needs PyTorch: pip install 'kpo-rs[torch]' (or pip install torch)"
    ) from exc

from ._common import LOSS_AGG_MODES, agg_loss, switch_rate
from ._registry import STACKS, LossNames, add_listener, register_loss, unregister_loss
from .baselines import gmpo_loss, gpg_loss, gspo_loss, ppo_clip_loss
from .kpo import GRADS, KPO_CLIP, check_finite, kpo_clipped_loss, kpo_loss, kpo_token_losses
from .peers import bapo_loss, dppo_loss, minpro_loss
from .table import LOSS_NAMES, LOSSES, LossSpec, check_names, get_loss

__all__ = [
    "GRADS",
    "KPO_CLIP",
    "LOSSES",
    "LOSS_AGG_MODES",
    "LOSS_NAMES",
    "STACKS",
    "LossNames",
    "LossSpec",
    "add_listener",
    "agg_loss",
    "bapo_loss",
    "check_finite",
    "check_names",
    "dppo_loss",
    "get_loss",
    "gmpo_loss",
    "gpg_loss",
    "gspo_loss",
    "kpo_clipped_loss",
    "kpo_loss",
    "kpo_token_losses",
    "minpro_loss",
    "ppo_clip_loss",
    "register_loss",
    "switch_rate",
    "unregister_loss",
]
