"""KPO for TRL: :class:`KPOTrainer`, a ``GRPOTrainer`` whose loss uses filtered ratios.

Only ``_compute_loss`` changes (as in TRL's own GMPO trainer); generation, rewards, advantages,
the reference model and logging are GRPO's. Use it like ``GRPOTrainer``::

    from kpo_rs.integrations.trl import KPOConfig, KPOTrainer

    args = KPOConfig(output_dir="out", num_iterations=4, loss_type="dapo")
    trainer = KPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset)
    trainer.train()

:class:`KPOConfig` adds ``kpo_loss_name``, any policy loss of :mod:`kpo_rs.losses` whose
aggregation is free (all but ``"gmpo"``): ``"kpo_clipped"`` (default, the paper's main variant:
the filtered ratio clipped to ``[1 - kpo_epsilon_low, 1 + kpo_epsilon_high]``, the KPO authors'
3e-4, 4e-4), ``"kpo"`` (no clip), or a baseline or peer (``"grpo"``, ``"gspo"``, ``"dppo_tv"``,
``"dppo_kl"``, ``"minpro"``, ``"bapo"``) with the table's recommended settings, overridden by
``kpo_loss_kwargs``. The KPO losses take the filter settings ``kpo_q``, ``kpo_r``, ``kpo_p0``,
``kpo_masked``, ``kpo_space``, ``kpo_grad``, ``kpo_backend`` (defaults:
:class:`kpo_rs.params.FilterParams`). Every ``kpo_*`` field is checked when the config is built.

What carries over from ``GRPOConfig``, done as ``GRPOTrainer`` (TRL 1.16) does it (with every
gain 1, ``kpo_q=1e20``, and ``kpo_epsilon_* = epsilon*``, ``KPOTrainer`` computes what
``GRPOTrainer`` computes; ``tests/test_trl.py`` holds it to that):

- ``loss_type`` ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"dapo"`` (the aggregations, for every
  ``kpo_loss_name``: each is a weighted sum over tokens, applied to the table's losses through
  their token weights);
- ``beta`` (KL to the reference) and ``use_bias_correction_kl`` (the KL term times the raw token
  ratio ``exp(logp - old_logp)``, as TRL);
- ``top_entropy_quantile`` (losses of low-entropy tokens zeroed, the normaliser still counts every
  valid token, as TRL);
- ``delta`` (INTELLECT-2's two-sided clip: for negative advantages the ratio is capped at
  ``delta``; for ``"kpo_clipped"`` this is verl's dual clip with ``clip_ratio_c = delta``, and
  needs ``delta > 1 + kpo_epsilon_high``);
- vLLM importance-sampling correction (every ``vllm_importance_sampling_mode``: ``token_truncate``,
  ``token_mask``, ``sequence_truncate``, ``sequence_mask``; TRL computes the weights from
  ``old_logp - sampling_logp`` per token, or summed per sequence, truncated to
  ``[vllm_importance_sampling_clip_min, clip_max]`` or zeroed outside it; they multiply the
  per-token losses as in GRPOTrainer, while KPO filters ``logp - old_logp``, so the filter smooths
  the policy's own drift and the weights correct the engine's mismatch; each mode is tested with
  recorded vLLM output against the hand computation);
- ``off_policy_mask_threshold`` (DeepSeek-V3.2's off-policy sequence mask, GRPOTrainer's own
  ``get_off_policy_mask`` on the sampling log-probs: negative-advantage sequences whose mean KL
  exceeds the threshold are dropped; the normaliser still counts their tokens, as TRL).

Refused when the config is built: other ``loss_type`` values, ``importance_sampling_level !=
"token"``, an entropy bonus (``entropy_coef``,
``use_adaptive_entropy``), ``delta`` with a loss other than ``"kpo_clipped"`` (the others have
their own dual clip setting, ``clip_ratio_c``, in ``kpo_loss_kwargs``).

GRPO's ``epsilon`` / ``epsilon_high`` do not change KPO's clip (``kpo_epsilon_low`` /
``kpo_epsilon_high`` do; TRL still uses them for its ``clip_ratio/*`` metrics of the raw ratio);
setting them on a ``KPOConfig`` warns. Metrics are logged under ``kpo/`` (clip fractions, raw and
filtered ratio statistics, sign-switch rates, and each loss's own).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError("kpo_rs.integrations.trl needs TRL: pip install 'kpo-rs[trl]'") from exc

import torch

from ..dump import RolloutDumper
from ..losses import GRADS, KPO_CLIP, LOSSES, LossNames, LossSpec, get_loss
from ..losses.kpo import warn_if_inert
from ..online import FIT, FilterFitter
from ..params import FilterParams, Masked, real_setting
from ..space import SPACES
from ..torch_ops import BACKENDS
from ._calls import call_loss, call_token_losses

__all__ = ["SUPPORTED_LOSS_NAMES", "SUPPORTED_LOSS_TYPES", "KPOConfig", "KPOTrainer"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
#: The losses TRL's aggregations can apply to: every registered loss whose ``stacks`` include
#: trl and whose aggregation is not fixed (a live view: a loss registered later is there too).
SUPPORTED_LOSS_NAMES = LossNames("trl", where=lambda spec: spec.honours_agg_mode)
# Settings of the table's losses that the trainer passes itself.
_TRAINER_SETTINGS = ("loss_agg_mode", "rollout_is_weights", "global_batch_info")
_FILTER_FIELDS = ("kpo_q", "kpo_r", "kpo_p0", "kpo_masked", "kpo_space", "kpo_grad", "kpo_backend")
_DEFAULTS = FilterParams()
# GRPOConfig's own defaults of the clip fields that KPO does not use.
_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
# Model inputs of multimodal batches, passed through to the log-prob computation as GRPO does.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class KPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the KPO settings (defaults: the KPO authors'); see the module
    documentation for which GRPO options carry over. Raises ``ValueError`` / ``TypeError`` naming
    the ``kpo_`` field (or the GRPO option) when built with a value KPO cannot honour."""

    kpo_loss_name: str = field(
        default="kpo_clipped",
        metadata={
            "help": "Policy loss, a name of kpo_rs.losses.LOSSES: 'kpo_clipped' (default), 'kpo', "
            "or a baseline or peer (" + ", ".join(repr(n) for n in SUPPORTED_LOSS_NAMES) + ")."
        },
    )
    kpo_loss_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Settings of a non-KPO kpo_loss_name over the table's recommended ones "
            "(a dict, or its JSON), e.g. {'clip_ratio_c': 10.0}."
        },
    )
    kpo_epsilon_low: float = field(
        default=KPO_CLIP[0],
        metadata={"help": "Lower clip of the filtered ratio, in [0, 1) (not GRPO's epsilon)."},
    )
    kpo_epsilon_high: float = field(
        default=KPO_CLIP[1],
        metadata={"help": "Upper clip of the filtered ratio, >= 0 (not GRPO's epsilon_high)."},
    )
    kpo_q: float | str = field(
        default=_DEFAULTS.q,
        metadata={
            "help": "Process-noise variance of the filter, >= 0; 'fit' (from Python) refits q "
            "and r on the batch's log-ratios every kpo_fit_every loss calls (kpo_rs.online)."
        },
    )
    kpo_r: float = field(
        default=_DEFAULTS.r, metadata={"help": "Observation-noise variance of the filter, > 0."}
    )
    kpo_p0: float = field(
        default=_DEFAULTS.p0, metadata={"help": "Prior variance, >= 0 (inf: flat prior)."}
    )
    kpo_masked: str = field(
        default=_DEFAULTS.masked, metadata={"help": "'hold' or 'zero' for masked tokens."}
    )
    kpo_space: str = field(default=SPACES[0], metadata={"help": "'log_ratio' or 'ratio'."})
    kpo_grad: str = field(
        default=GRADS[0], metadata={"help": "'token' (paper) or 'filter' (adjoint)."}
    )
    kpo_backend: str = field(
        default=BACKENDS[0],
        metadata={"help": f"Filter backend, one of {BACKENDS}."},
    )
    kpo_fit_every: int = field(
        default=10, metadata={"help": "With kpo_q='fit': refit every this many loss calls."}
    )
    kpo_dump_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for rollout dumps (Parquet shards of sampled rows, for "
            "`kpo analyze DIR`); none when unset (kpo_rs.dump)."
        },
    )
    kpo_dump_every: int = field(default=10, metadata={"help": "Dump every this many steps."})
    kpo_dump_rows: int = field(default=64, metadata={"help": "Rows per dump and process."})
    kpo_dump_max_mb: float = field(
        default=1024.0, metadata={"help": "The most the dumps of one process write, MiB."}
    )

    def __post_init__(self) -> None:
        self._check_kpo_fields()
        self._check_grpo_options()
        super().__post_init__()

    def _check_kpo_fields(self) -> None:
        try:
            FilterParams(
                q=_DEFAULTS.q if self.kpo_q == FIT else cast(float, self.kpo_q),
                r=self.kpo_r,
                p0=self.kpo_p0,
                masked=cast(Masked, self.kpo_masked),
            )
        except (TypeError, ValueError) as exc:
            # FilterParams names its field first ("q must be ..."): name the config's field.
            raise type(exc)(f"kpo_{exc}") from None
        if isinstance(self.kpo_q, str) and self.kpo_q != FIT:
            raise ValueError(f"kpo_q must be a number >= 0 or 'fit', got {self.kpo_q!r}")
        for name in ("kpo_fit_every", "kpo_dump_every", "kpo_dump_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.kpo_dump_max_mb, (int, float)) and self.kpo_dump_max_mb > 0):
            raise ValueError(f"kpo_dump_max_mb must be a number > 0, got {self.kpo_dump_max_mb!r}")
        if self.kpo_loss_name not in SUPPORTED_LOSS_NAMES:
            why = (
                f"{self.kpo_loss_name!r} fixes its own aggregation, which TRL's loss_type sets"
                if self.kpo_loss_name in LOSSES
                else f"got {self.kpo_loss_name!r}"
            )
            raise ValueError(f"kpo_loss_name must be one of {tuple(SUPPORTED_LOSS_NAMES)}: {why}")
        self._check_loss_kwargs()
        ignored = [
            f
            for f in (*_FILTER_FIELDS, "kpo_epsilon_low", "kpo_epsilon_high")
            if getattr(self, f) != _FIELD_DEFAULTS[f]
        ]
        if not self.kpo_loss_spec.filtered and ignored:
            warnings.warn(
                f"{', '.join(ignored)} only apply to kpo_loss_name 'kpo' or 'kpo_clipped', "
                f"not {self.kpo_loss_name!r}",
                UserWarning,
                stacklevel=4,
            )
        low = real_setting("kpo_epsilon_low", self.kpo_epsilon_low)
        high = real_setting("kpo_epsilon_high", self.kpo_epsilon_high)
        if not 0.0 <= low < 1.0:
            raise ValueError(f"kpo_epsilon_low must be in [0, 1), got {low!r}")
        if not (math.isfinite(high) and high >= 0.0):
            raise ValueError(f"kpo_epsilon_high must be a finite number >= 0, got {high!r}")
        for name, value, allowed in (
            ("kpo_space", self.kpo_space, SPACES),
            ("kpo_grad", self.kpo_grad, GRADS),
            ("kpo_backend", self.kpo_backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def _check_grpo_options(self) -> None:
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {SUPPORTED_LOSS_TYPES} for KPO, got {self.loss_type!r}"
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                "importance_sampling_level must be 'token' for KPO (it filters token ratios), "
                f"got {self.importance_sampling_level!r}"
            )
        # getattr: options that older TRL releases do not have are off there
        if getattr(self, "entropy_coef", 0.0) != 0.0 or getattr(
            self, "use_adaptive_entropy", False
        ):
            raise ValueError(
                "entropy_coef / use_adaptive_entropy (an entropy bonus) are not supported by "
                "KPOTrainer"
            )
        if self.delta is not None:
            delta = real_setting("delta", self.delta)
            if self.kpo_loss_name != "kpo_clipped":
                raise ValueError(
                    "delta (two-sided clip) needs kpo_loss_name='kpo_clipped'; other losses set "
                    "their dual clip, where they have one, with kpo_loss_kwargs={'clip_ratio_c': c}"
                )
            if not delta > 1.0 + self.kpo_epsilon_high:
                raise ValueError(
                    f"delta must be > 1 + kpo_epsilon_high = {1.0 + self.kpo_epsilon_high!r}, "
                    f"got {delta!r}"
                )
        changed = [
            name
            for name in ("epsilon", "epsilon_high")
            if getattr(self, name) != _GRPO_DEFAULTS[name]
        ]
        if changed:
            warnings.warn(
                f"{' and '.join(changed)} {'does' if len(changed) == 1 else 'do'} not change "
                "KPO's clip, which is "
                f"[1 - kpo_epsilon_low, 1 + kpo_epsilon_high] = "
                f"[1 - {self.kpo_epsilon_low}, 1 + {self.kpo_epsilon_high}]; "
                "set kpo_epsilon_low / kpo_epsilon_high instead",
                UserWarning,
                stacklevel=4,
            )

    def _check_loss_kwargs(self) -> None:
        kwargs = self.kpo_loss_kwargs
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as exc:
                raise ValueError(f"kpo_loss_kwargs is not valid JSON: {exc}") from None
            self.kpo_loss_kwargs = kwargs
        if kwargs is None:
            return
        if not isinstance(kwargs, dict):
            raise TypeError(f"kpo_loss_kwargs must be a dict, got {type(kwargs).__name__}")
        if self.kpo_loss_spec.filtered:
            raise ValueError(
                "kpo_loss_kwargs is for the table's other losses; KPO's settings are the kpo_* "
                "fields (kpo_q, kpo_epsilon_low, ...)"
            )
        fixed = sorted(set(kwargs) & set(_TRAINER_SETTINGS))
        if fixed:
            raise ValueError(
                f"kpo_loss_kwargs cannot set {fixed[0]!r}: the trainer sets it (loss_type, vLLM "
                "correction, entropy mask)"
            )
        try:
            self.kpo_loss_spec.keywords(**kwargs)
        except ValueError as exc:
            raise ValueError(f"kpo_loss_kwargs: {exc}") from None

    @property
    def kpo_loss_keywords(self) -> dict[str, Any]:
        """``kpo_loss_kwargs`` as a dict (a JSON string from the command line is parsed by
        ``__post_init__``), empty when not given."""
        return cast(dict, self.kpo_loss_kwargs or {})

    @property
    def kpo_loss_spec(self) -> LossSpec:
        """The :mod:`kpo_rs.losses` entry of ``kpo_loss_name``."""
        return get_loss(self.kpo_loss_name)

    @property
    def kpo_filter_params(self) -> FilterParams:
        """The filter's settings as a :class:`~kpo_rs.params.FilterParams` (with
        ``kpo_q='fit'``: the default q, the fitter's start and fallback)."""
        return FilterParams(
            q=_DEFAULTS.q if self.kpo_q == FIT else cast(float, self.kpo_q),
            r=self.kpo_r,
            p0=self.kpo_p0,
            masked=cast(Masked, self.kpo_masked),
        )


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KPOConfig)}


class KPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the KPO / KPO-clipped policy loss (see the module documentation)."""

    _tag_names = ["trl", "kpo"]  # noqa: RUF012 - GRPOTrainer declares it an instance attribute
    args: KPOConfig  # set by GRPOTrainer.__init__ from the KPOConfig checked below

    def __init__(self, model: Any, reward_funcs: Any, args: KPOConfig | None = None, **kwargs: Any):
        if args is None:
            args = KPOConfig("kpo-output")
        if not isinstance(args, KPOConfig):
            raise TypeError(f"args must be a KPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.kpo_fitter = (
            FilterFitter(base=args.kpo_filter_params, every=args.kpo_fit_every)
            if args.kpo_q == FIT
            else None
        )
        self.kpo_dumper = (
            None
            if args.kpo_dump_dir is None
            else RolloutDumper(
                args.kpo_dump_dir,
                every=args.kpo_dump_every,
                rows=args.kpo_dump_rows,
                max_mb=args.kpo_dump_max_mb,
            )
        )

    def _kpo_settings(self) -> dict[str, Any]:
        a = self.args
        fit = {} if self.kpo_fitter is None else {"q": FIT, "fitter": self.kpo_fitter}
        return {
            **fit,
            "clip": (
                (a.kpo_epsilon_low, a.kpo_epsilon_high)
                if "clip" in a.kpo_loss_spec.from_stack
                else None
            ),
            "clip_ratio_c": a.delta,
            "params": a.kpo_filter_params,
            "space": a.kpo_space,
            "grad": a.kpo_grad,
            "backend": a.kpo_backend,
        }

    def _aggregate(
        self, per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, inputs: dict
    ) -> torch.Tensor:
        """TRL's aggregation for ``self.loss_type`` (gradient accumulation included)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        masked = per_token_loss * mask
        if self.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return (
                masked.sum()
                / (per_token_loss.size(0) * cast(int, self.max_completion_length))
                / accumulation
            )
        return masked.sum() / self._dapo_normalizer(mode, inputs)

    def _dapo_normalizer(self, mode: str, inputs: dict) -> torch.Tensor:
        """The "dapo" loss type's divisor: the generation batch's token count, per process and
        (in training) per gradient accumulation window."""
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = (
                normalizer
                * self.current_gradient_accumulation_steps
                / self.args.steps_per_generation
            )
        return normalizer

    def _token_weights(self, mask: torch.Tensor, mode: str, inputs: dict) -> torch.Tensor:
        """``[batch, time]`` weights ``w`` with ``(loss * mask * w).sum()`` equal to
        :meth:`_aggregate` ``(loss, mask)``: every TRL aggregation is a weighted token sum."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        mask = mask.to(torch.float32 if not mask.is_floating_point() else mask.dtype)
        if self.loss_type == "grpo":
            per_row = 1.0 / (mask.sum(-1, keepdim=True).clamp(min=1.0) * mask.size(0))
            return (per_row / accumulation).expand_as(mask)
        if self.loss_type == "bnpo":
            scale = 1.0 / (mask.sum().clamp(min=1.0) * accumulation)
        elif self.loss_type == "dr_grpo":
            scale = torch.tensor(
                1.0 / (mask.size(0) * cast(int, self.max_completion_length) * accumulation),
                device=mask.device,
            )
        else:  # "dapo"
            scale = 1.0 / self._dapo_normalizer(mode, inputs)
        return scale.to(mask.dtype).expand_as(mask)

    def _table_loss(
        self,
        old_logps: torch.Tensor,
        logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        token_weights: torch.Tensor,
        mode: str,
        inputs: dict,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A loss of :mod:`kpo_rs.losses` aggregated as TRL's ``loss_type``: its token sum
        with the aggregation's weights times the entropy mask and vLLM ratio (``token_weights``)."""
        weights = self._token_weights(mask, mode, inputs).to(logps.dtype) * token_weights
        return call_loss(
            self.args.kpo_loss_spec,
            old_logps,
            logps,
            advantages,
            mask.bool(),
            {
                **self.args.kpo_loss_keywords,
                "loss_agg_mode": "token-sum",
                "rollout_is_weights": weights,
            },
        )

    def _compute_loss(self, model: Any, inputs: dict) -> torch.Tensor:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        aux_enabled = getattr(self, "aux_loss_enabled", False)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=aux_enabled,
            **{key: inputs.get(key) for key in _MULTIMODAL_KEYS},
        )
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)

        assert self.model is not None  # GRPOTrainer sets it
        mode = "train" if self.model.training else "eval"
        # As GRPOTrainer: low-entropy tokens' losses are zeroed, but every valid token still counts
        # in the normaliser; then the vLLM correction, then the KL term.
        token_weights = torch.ones((), dtype=logps.dtype, device=logps.device)
        if self.top_entropy_quantile < 1.0:
            token_weights = token_weights * self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
        off_policy = getattr(self, "off_policy_mask_threshold", None) is not None
        if off_policy:
            # GRPOTrainer's mask, from the sampling log-probs when vLLM gave them
            token_weights = token_weights * self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logps),
                mask=mask,
                off_policy_threshold=cast(float, self.off_policy_mask_threshold),
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            token_weights = token_weights * inputs["importance_sampling_ratio"]
        per_token_kl = None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
            if getattr(self.args, "use_bias_correction_kl", False):
                # the raw token ratio, differentiable, as GRPOTrainer
                per_token_kl = per_token_kl * torch.exp(logps - old_logps)

        spec = self.args.kpo_loss_spec
        if spec.filtered and spec.token_losses is not None:
            # GRPOTrainer's own sequence of operations (with every gain 1, the same numbers)
            settings = self._kpo_settings()
            if "engine_log_prob" in spec.accepted:
                settings["engine_log_prob"] = inputs.get("sampling_per_token_logps")
            per_token_loss, stats = call_token_losses(
                spec, old_logps, logps, advantages.expand_as(logps), mask.bool(), settings
            )
            if (
                off_policy
                or self.top_entropy_quantile < 1.0
                or (self.use_vllm and self.vllm_importance_sampling_correction)
            ):
                per_token_loss = per_token_loss * token_weights
            if per_token_kl is not None:
                per_token_loss = per_token_loss + self.beta * per_token_kl
            loss = self._aggregate(per_token_loss, mask, mode, inputs)
        else:
            loss, stats = self._table_loss(
                old_logps, logps, advantages.expand_as(logps), mask, token_weights, mode, inputs
            )
            if per_token_kl is not None:
                loss = loss + self._aggregate(self.beta * per_token_kl, mask, mode, inputs)

        if self.kpo_dumper is not None and mode == "train":
            # the copy to the host happens only at dump steps (one shard per global step)
            self.kpo_dumper(
                logps,
                old_logps,
                mask.bool(),
                advantages.expand_as(logps),
                engine_log_prob=inputs.get("sampling_per_token_logps"),
                step=self.state.global_step,
            )
        if aux_enabled:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

        def global_mean(values: torch.Tensor) -> float:
            return float(self.accelerator.gather(values.detach().reshape(1)).nanmean())

        m = mask.bool()
        self._metrics[mode]["entropy"].append(
            global_mean((entropies * m).sum() / m.sum().clamp(min=1))
        )
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(
                global_mean((per_token_kl * m).sum() / m.sum().clamp(min=1))
            )
        for key, value in stats.items():
            self._metrics[mode][f"kpo/{key}"].append(global_mean(value))
        if "kpo_data_weight" in stats:
            warn_if_inert(
                self._metrics[mode]["kpo/kpo_data_weight"][-1], m, self.args.kpo_loss_keywords
            )
        return loss
