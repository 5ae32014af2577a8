"""KPO policy losses for slime (THUDM/slime), as its custom loss.

slime calls a custom loss as ``fn(args, batch, logits, sum_of_sample_mean) -> (loss, metrics)``
(``slime/backends/megatron_utils/loss.py``, ``loss_function`` with ``--loss-type custom_loss``
and ``--custom-loss-function-path``): ``args`` its argument namespace, ``batch`` the micro batch
(per-sample lists ``unconcat_tokens``, ``total_lengths``, ``response_lengths``, ``loss_masks``,
``advantages``, ``log_probs``, ``rollout_log_probs``, ...), ``logits`` ``[1, T, V]`` float32 and
``sum_of_sample_mean`` slime's reducer of a concatenated per-token tensor. The functions here do
what slime's ``policy_loss_function`` does with the per-token PPO loss replaced by KPO's:

- the response log-probs (and entropy) from ``logits`` by slime's own
  ``get_log_probs_and_entropy``; the old policy is ``rollout_log_probs`` with
  ``--use-rollout-logprobs``, else ``log_probs`` (the current, detached, when absent);
- the per-token KPO (or KPO-clipped) losses, each sample's response one row of the filter, the
  clip being slime's ``--eps-clip`` / ``--eps-clip-high`` (set them to the KPO authors' 3e-4 /
  4e-4) and its dual clip ``--eps-clip-c``; the filter settings come from the ``KPO_*``
  environment variables of the verl plug-in (:data:`ENV_VARS`);
- ``--use-tis`` / ``--get-mismatch-metrics``: slime's TIS function (``vanilla_tis_function`` or
  ``--custom-tis-function-path``) weights the per-token losses and its masks rebuild the
  reducer, as slime does; the filter has already run over the original ``loss_masks``;
- ``--custom-pg-loss-reducer-function-path``, ``--entropy-coef``, ``--use-kl-loss`` (slime's
  ``compute_approx_kl``) as in slime. So the aggregation is slime's (``sum_of_sample_mean``:
  per-sample or per-rollout means, or token sums with ``--calculate-per-token-loss``).

Context parallelism: slime cuts each sample into chunks spread over the context-parallel ranks
(``--context-parallel-size`` > 1), so no rank holds a whole response, and a causal filter at
token ``t`` needs every earlier token of the response (or a state carried from the rank that
holds them). The functions refuse ``--context-parallel-size`` > 1 with the fix rather than
filter pieces of responses. ``--use-opsm`` (a sequence mask over gathered log-probs) is refused
too.

Use::

    --loss-type custom_loss \\
    --custom-loss-function-path kpo_rs.integrations.slime.kpo_clipped_loss \\
    --eps-clip 3e-4 --eps-clip-high 4e-4

slime is not on PyPI (it installs from source with Megatron-LM), so these functions are tested
against its calling convention reproduced from its source, not inside slime.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from ..losses import LossNames, LossSpec
from ._calls import Generated, call_token_losses
from ._env import FILTER_ENV_VARS, filter_settings
from ._notices import idle_clip_message, log_settings, warn_once
from ._observe import dump_rollouts, online_kwargs

__all__ = ["ENV_VARS", "LOSS_NAMES", "check_context_parallel", "loss_fn"]

#: Filter setting -> (environment variable, default), as the verl plug-in reads them.
ENV_VARS: dict[str, tuple[str, Any]] = dict(FILTER_ENV_VARS)
#: The losses offered: every registered loss whose ``stacks`` include slime (a live view; each
#: has a per-token form, as slime aggregates itself). Each is served as
#: ``kpo_rs.integrations.slime.<name>_loss``, the path ``--custom-loss-function-path`` names.
LOSS_NAMES = LossNames("slime")


def _slime() -> SimpleNamespace:
    """slime's functions that the losses call (imported when a loss first runs)."""
    try:
        from slime.backends.megatron_utils import loss as slime_loss
        from slime.backends.megatron_utils.cp_utils import get_sum_of_sample_mean
        from slime.utils.misc import load_function
        from slime.utils.ppo_utils import compute_approx_kl
    except ImportError as exc:
        raise ImportError(
            "kpo_rs.integrations.slime runs inside slime (github.com/THUDM/slime); "
            f"it could not import it: {exc}"
        ) from exc
    return SimpleNamespace(
        get_log_probs_and_entropy=slime_loss.get_log_probs_and_entropy,
        top_p_kwargs=getattr(slime_loss, "get_rollout_top_p_logprob_kwargs", lambda a, b: {}),
        vanilla_tis_function=slime_loss.vanilla_tis_function,
        get_sum_of_sample_mean=get_sum_of_sample_mean,
        load_function=load_function,
        compute_approx_kl=compute_approx_kl,
    )


def check_context_parallel(args: Any) -> None:
    """ValueError (one line, with the fix) when slime's args split responses over
    context-parallel ranks, where a causal filter would see pieces of responses."""
    size = int(getattr(args, "context_parallel_size", 1) or 1)
    if size > 1:
        raise ValueError(
            f"--context-parallel-size {size}: slime splits each response over the "
            "context-parallel ranks, and KPO's causal filter needs the whole response on one "
            "rank; set --context-parallel-size 1 (use tensor or pipeline parallelism, or a "
            "smaller --max-tokens-per-gpu, for memory)"
        )


def _padded(rows: list[torch.Tensor], fill: float | bool) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


_last_logged: list[dict[str, Any]] = []
_warned_once: set[str] = set()


def _announce(name: str, clip: tuple[float, float] | None, metrics: Any) -> None:
    """The start-up line (once per process, again when the settings change) and, for a
    PPO-scale ``--eps-clip`` that does not bite on the filtered ratios, a warning once."""
    values = {k: v for k, v in filter_settings().items() if k in ("q", "r", "p0")}
    origins = [var for var, _ in FILTER_ENV_VARS.values() if var in os.environ]
    agg = "slime's sum_of_sample_mean"
    log_settings(_last_logged, "slime", name, clip, agg, values, origins)
    if clip is not None and f"idle-clip:{name}" not in _warned_once:
        message = idle_clip_message(name, clip, metrics, "--eps-clip 3e-4 --eps-clip-high 4e-4")
        if message is not None:
            warn_once(_warned_once, f"idle-clip:{name}", message, stacklevel=5)


def _token_losses(
    spec: LossSpec,
    args: Any,
    old: list[torch.Tensor],
    new: list[torch.Tensor],
    advantages: list[torch.Tensor],
    masks: list[torch.Tensor],
    engine: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The concatenated per-token losses of ``spec`` over the samples (each response one row:
    one filter row for a filtered loss); ``engine``: the rollout log-probs when they are not
    already the old policy's. The clip is slime's ``--eps-clip`` / ``--eps-clip-high`` where the
    loss takes its stack's clip, the dual clip ``--eps-clip-c`` where it takes one, the filter's
    settings the ``KPO_*`` variables."""
    lengths = [t.numel() for t in new]
    mask = _padded([m.bool() for m in masks], False)
    old_p, new_p, adv_p = _padded(old, 0.0), _padded(new, 0.0), _padded(advantages, 0.0)
    engine_p = None if not engine else _padded(engine, 0.0)
    dump_rollouts(new_p, old_p, mask, adv_p, engine_log_prob=engine_p)  # KPO_DUMP_DIR
    kwargs: dict[str, Any] = {}
    if "clip" in spec.from_stack:
        high = getattr(args, "eps_clip_high", None)
        kwargs["clip"] = (float(args.eps_clip), float(args.eps_clip if high is None else high))
    if "clip_ratio_c" in spec.accepted:
        dual = getattr(args, "eps_clip_c", None)
        kwargs["clip_ratio_c"] = None if dual is None else float(dual)
    if spec.filtered:
        kwargs.update(online_kwargs(filter_settings()))  # KPO_Q=fit: fitted online
        if "engine_log_prob" in spec.accepted:
            kwargs["engine_log_prob"] = engine_p
    pg, metrics = call_token_losses(spec, old_p, new_p, adv_p, mask, kwargs)
    if spec.filtered:
        _announce(spec.name, kwargs.get("clip", spec.defaults.get("clip")), metrics)
    pg = torch.where(mask, pg, 0.0)  # slime's reducer multiplies by the mask: no NaN may pass
    flat = torch.cat([row[:n] for row, n in zip(pg, lengths)]) if lengths else pg.reshape(0)
    return flat, metrics


def _custom_loss(spec: LossSpec) -> Any:
    """The slime custom loss of ``spec`` (see :func:`loss_fn`)."""
    name = spec.name

    def compute(
        args: Any, batch: dict[str, Any], logits: torch.Tensor, sum_of_sample_mean: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_context_parallel(args)
        if getattr(args, "use_opsm", False):
            raise ValueError(
                "--use-opsm: OPSM's sequence mask is not supported with kpo-rs losses; drop it"
            )
        s = _slime()
        total_lengths, response_lengths = batch["total_lengths"], batch["response_lengths"]
        _, out = s.get_log_probs_and_entropy(
            logits,
            args=args,
            unconcat_tokens=batch["unconcat_tokens"],
            total_lengths=total_lengths,
            response_lengths=response_lengths,
            with_entropy=True,
            **s.top_p_kwargs(args, batch),
        )
        log_probs = out["log_probs"]
        rollout = batch.get("rollout_log_probs")
        old = rollout if getattr(args, "use_rollout_logprobs", False) else batch.get("log_probs")
        if not old:
            old = [lp.detach() for lp in log_probs]
        # the engine's log-probs, for the mismatch metrics, when the old policy is the trainer's
        engine = None if getattr(args, "use_rollout_logprobs", False) else rollout
        pg_loss, own = _token_losses(
            spec, args, old, log_probs, batch["advantages"], batch["loss_masks"], engine
        )
        new_cat, old_cat = torch.cat(log_probs), torch.cat(old)
        metrics_reducer = sum_of_sample_mean
        masks = batch["loss_masks"]
        tis_metrics: dict[str, torch.Tensor] = {}
        mismatch = getattr(args, "get_mismatch_metrics", False) or getattr(args, "use_tis", False)
        if mismatch:
            if not rollout:
                raise ValueError("--use-tis needs rollout_log_probs in the batch")
            path = getattr(args, "custom_tis_function_path", None)
            tis = s.vanilla_tis_function if path is None else s.load_function(path)
            train = batch.get("log_probs") or [lp.detach() for lp in log_probs]
            pg_loss, masks, tis_metrics = tis(
                args=args,
                pg_loss=pg_loss,
                train_log_probs=train,
                rollout_log_probs=rollout,
                loss_masks=batch["loss_masks"],
                total_lengths=total_lengths,
                response_lengths=response_lengths,
            )
            sum_of_sample_mean = s.get_sum_of_sample_mean(
                total_lengths,
                response_lengths,
                masks,
                batch.get("rollout_mask_sums"),
                args.calculate_per_token_loss,
            )
        reducer_path = getattr(args, "custom_pg_loss_reducer_function_path", None)
        if reducer_path is not None:
            reducer = s.load_function(reducer_path)(
                total_lengths, response_lengths, masks, args.calculate_per_token_loss
            )
        else:
            reducer = sum_of_sample_mean
        pg = reducer(pg_loss)
        entropy_loss = sum_of_sample_mean(torch.cat(out["entropy"]))
        loss = pg - float(getattr(args, "entropy_coef", 0.0)) * entropy_loss
        reported = {
            "pg_loss": pg.detach(),
            "entropy_loss": entropy_loss.detach(),
            "ppo_kl": sum_of_sample_mean(old_cat - new_cat).detach(),
        }
        if getattr(args, "use_kl_loss", False):
            ratio = None
            if getattr(args, "use_unbiased_kl", False):
                ratio = torch.exp(new_cat - old_cat)
            kl = s.compute_approx_kl(
                new_cat,
                torch.cat(batch["ref_log_probs"]),
                kl_loss_type=args.kl_loss_type,
                importance_ratio=ratio,
            )
            kl_loss = sum_of_sample_mean(kl)
            loss = loss + args.kl_loss_coef * kl_loss
            reported["kl_loss"] = kl_loss.detach()
        if new_cat.numel() == 0:
            loss = loss + 0 * logits.sum()  # a graph on every rank, as slime's loss keeps one
        for key, value in tis_metrics.items():
            reported[key] = metrics_reducer(value).detach()
        # KPO's own metrics are token means of this micro batch; slime adds micro batches and
        # divides by the step's samples (tokens with --calculate-per-token-loss), so scale them
        per_token = getattr(args, "calculate_per_token_loss", False)
        weight = (
            sum(max(int(m.sum()), 1) for m in batch["loss_masks"])
            if per_token
            else len(batch["loss_masks"])
        )
        premise = [k for k in own if k.startswith("kpo_") and k != "kpo_data_weight"]
        for key in ("pg_clipfrac", "filtered_ratio_mean", "switch_rate_filtered", *premise):
            if key in own:
                reported[key] = own[key] * weight
        return loss, {"loss": loss.detach(), **reported}

    compute.__name__ = compute.__qualname__ = f"{name}_loss"
    compute.__module__ = __name__
    return compute


_LOSSES = Generated("slime", _custom_loss, suffix="_loss")


def loss_fn(name: str) -> Any:
    """The slime custom loss computing the registered loss ``name`` (one of :data:`LOSS_NAMES`)
    with slime's signature ``fn(args, batch, logits, sum_of_sample_mean) -> (loss, metrics)``;
    ValueError for another name. It is also ``kpo_rs.integrations.slime.<name>_loss``."""
    return _LOSSES.get(name)


def __getattr__(attr: str) -> Any:
    """``<name>_loss``: :func:`loss_fn` of every loss in :data:`LOSS_NAMES`."""
    return _LOSSES.attribute(__name__, attr)
