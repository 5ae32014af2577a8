"""KPO for TRL: :class:`KPOTrainer`, a ``GRPOTrainer`` whose loss uses filtered ratios.

Only ``_compute_loss`` changes (as in TRL's own GMPO trainer); generation, rewards, advantages,
the reference model and logging are GRPO's. Use it like ``GRPOTrainer``::

    from kpo_rs.integrations.trl import KPOConfig, KPOTrainer

    args = KPOConfig(output_dir="out", num_iterations=4, loss_type="dapo")
    trainer = KPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset)
    trainer.train()

:class:`KPOConfig` adds the filter settings (``kpo_q``, ``kpo_r``, ``kpo_p0``, ``kpo_masked``,
``kpo_space``, ``kpo_grad``) and the variant: ``kpo_clip=True`` (default, KPO-clipped) clips the
filtered ratio to ``[1 - kpo_epsilon_low, 1 + kpo_epsilon_high]`` (the KPO authors' 3e-4, 4e-4);
``kpo_clip=False`` is plain KPO. TRL's ``loss_type`` aggregations ``"grpo"``, ``"bnpo"``,
``"dr_grpo"`` and ``"dapo"`` work as in ``GRPOTrainer``, as do ``beta`` (KL to the reference),
``top_entropy_quantile`` and vLLM importance-sampling correction. Metrics are logged under
``kpo/`` (clip fractions, raw and filtered ratio statistics, sign-switch rates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError("kpo_rs.integrations.trl needs TRL: pip install 'kpo-rs[trl]'") from exc

import torch

from ..losses import KPO_CLIP, kpo_token_losses

__all__ = ["SUPPORTED_LOSS_TYPES", "KPOConfig", "KPOTrainer"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
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
    """``GRPOConfig`` plus the KPO settings (defaults: the KPO authors')."""

    kpo_clip: bool = field(
        default=True, metadata={"help": "Clip the filtered ratio (KPO-clipped)."}
    )
    kpo_epsilon_low: float = field(
        default=KPO_CLIP[0], metadata={"help": "Lower clip of the filtered ratio."}
    )
    kpo_epsilon_high: float = field(
        default=KPO_CLIP[1], metadata={"help": "Upper clip of the filtered ratio."}
    )
    kpo_q: float = field(default=1e-6, metadata={"help": "Process-noise variance of the filter."})
    kpo_r: float = field(
        default=1.0, metadata={"help": "Observation-noise variance of the filter."}
    )
    kpo_p0: float = field(default=0.0, metadata={"help": "Prior variance (inf: flat prior)."})
    kpo_masked: str = field(
        default="hold", metadata={"help": "'hold' or 'zero' for masked tokens."}
    )
    kpo_space: str = field(default="log_ratio", metadata={"help": "'log_ratio' or 'ratio'."})
    kpo_grad: str = field(
        default="token", metadata={"help": "'token' (paper) or 'filter' (adjoint)."}
    )


class KPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the KPO / KPO-clipped policy loss (see the module documentation)."""

    _tag_names: ClassVar[list[str]] = ["trl", "kpo"]

    def __init__(self, model: Any, reward_funcs: Any, args: KPOConfig | None = None, **kwargs: Any):
        if args is None:
            args = KPOConfig("kpo-output")
        if not isinstance(args, KPOConfig):
            raise TypeError(f"args must be a KPOConfig, got {type(args).__name__}")
        if args.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"KPOTrainer supports loss_type in {SUPPORTED_LOSS_TYPES}, got {args.loss_type!r}"
            )
        if args.importance_sampling_level != "token":
            raise ValueError("KPO filters token ratios: importance_sampling_level must be 'token'")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        unsupported = []
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            unsupported.append("off_policy_mask_threshold")
        if getattr(self, "_entropy_bonus_enabled", False):
            unsupported.append("an entropy bonus")
        if unsupported:
            raise ValueError(f"KPOTrainer does not support {', '.join(unsupported)}")

    def _kpo_settings(self) -> dict[str, Any]:
        a = self.args
        clip = (a.kpo_epsilon_low, a.kpo_epsilon_high) if a.kpo_clip else None
        return {
            "clip": clip,
            "q": a.kpo_q,
            "r": a.kpo_r,
            "p0": a.kpo_p0,
            "masked": a.kpo_masked,
            "space": a.kpo_space,
            "grad": a.kpo_grad,
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
                masked.sum() / (per_token_loss.size(0) * self.max_completion_length) / accumulation
            )
        # "dapo": normalise by the generation batch's token count, per accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = (
                normalizer
                * self.current_gradient_accumulation_steps
                / self.args.steps_per_generation
            )
        return masked.sum() / normalizer

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

        loss_mask = mask
        if self.top_entropy_quantile < 1.0:
            loss_mask = mask * self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )

        per_token_loss, stats = kpo_token_losses(
            old_logps,
            logps,
            advantages.expand_as(logps),
            mask.bool(),
            **self._kpo_settings(),
        )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
            per_token_loss = per_token_loss + self.beta * per_token_kl

        mode = "train" if self.model.training else "eval"
        loss = self._aggregate(per_token_loss, loss_mask, mode, inputs)
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
        return loss
