"""Every policy loss kpo-rs has, by name, with the settings its authors recommend.

One table for the demo, the sweep, the plug-ins and users: pick a loss by name and call it with
verl's four tensors; its recommended settings are filled in and any of them can be overridden.
The table is the registry of :mod:`kpo_rs.losses._registry`: each loss registers itself next to
its function with ``@kpo_rs.losses.register_loss(name, defaults=..., paper=..., description=...,
stacks=...)``; importing this module registers the built-in ones (:mod:`~kpo_rs.losses.baselines`,
:mod:`~kpo_rs.losses.kpo`, :mod:`~kpo_rs.losses.peers`).

API (small and stable):

``LOSSES: Mapping[str, LossSpec]``
    Read-only live mapping, name -> :class:`LossSpec`, in registration order: ``grpo``,
    ``gspo``, ``gmpo``, ``gpg`` (verl's), ``kpo``, ``kpo_clipped``, then the peers ``dppo_tv``,
    ``dppo_kl``, ``minpro``, ``bapo``; then any loss registered later.
``LOSS_NAMES: tuple[str, ...]``
    The built-in losses' names, in that order (a loss registered later is in ``LOSSES``, and
    in :class:`LossNames` views, not here).
``get_loss(name) -> LossSpec``
    The entry of ``name``; ``ValueError`` listing the known names otherwise.
``check_names(names, label)``
    ``ValueError`` prefixed with ``label`` unless every name is registered.
``LossSpec``
    Frozen: ``name``, ``fn`` (the loss function), ``defaults`` (read-only mapping of the keyword
    arguments the table passes), ``description`` (one line), ``paper`` (title and arXiv id),
    ``stacks`` (the plug-ins that offer it), ``from_stack`` (the settings they take from their
    stack's config), ``token_losses`` (the per-token form, or None), ``honours_agg_mode``
    (False for a loss whose aggregation is fixed, e.g. GMPO).
    ``spec(old_log_prob, log_prob, advantages, response_mask, **overrides) -> (loss, metrics)``
    calls ``fn`` with ``defaults`` updated by ``overrides`` (an override replaces the default,
    ``None`` included); ``spec.keywords(**overrides)`` returns that dict without calling. An
    override the function does not accept raises ``ValueError`` naming it.

Tensors are ``[batch, response_len]`` (``response_mask`` bool or 0/1), log-probs in nats; ``loss``
is a scalar tensor, ``metrics`` a dict of detached scalar tensors in verl's names. Each loss's own
docstring gives its details. The filter's settings of the KPO losses are not written here: they
come from :class:`kpo_rs.params.FilterParams` through the loss functions.
"""

from __future__ import annotations

from . import baselines, kpo, peers  # noqa: F401  (registers the built-in losses)
from ._registry import LOSSES, LossSpec, check_names, get_loss

__all__ = ["LOSSES", "LOSS_NAMES", "LossSpec", "check_names", "get_loss"]

#: The built-in losses' names, in registration order.
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
