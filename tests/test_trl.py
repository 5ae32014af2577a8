"""TRL: real KPOTrainer runs on CPU with a tiny random model and a locally built tokenizer;
KPOConfig's checks; and, with every gain 1 (``kpo_q=1e20``), KPOTrainer equal to GRPOTrainer for
every option it accepts.

Equality is exact (``torch.equal``): with gains of exactly 1 the filter returns the log-ratio
itself, and KPOTrainer then evaluates GRPO's formulas with the same operations in the same order,
so there is no rounding to allow for.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("trl")

from transformers import LlamaForCausalLM, set_seed
from trl import GRPOConfig, GRPOTrainer

from helpers import (
    TINY_VOCAB,
    reward_count_a,
    tiny_llama,
    tiny_prompts,
    tiny_tokenizer,
    tiny_training,
)
from kpo_rs.integrations.trl import (
    SUPPORTED_LOSS_NAMES,
    SUPPORTED_LOSS_TYPES,
    KPOConfig,
    KPOTrainer,
)
from kpo_rs.losses import get_loss

pytestmark = pytest.mark.integration


@pytest.mark.slow  # a training run
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_kpo_trainer_runs_and_learns(tmp_path, loss_type):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(TINY_VOCAB))
    before = [p.detach().clone() for p in model.parameters()]
    # tiny_training: two passes over each batch, so the second sees ratios != 1
    args = KPOConfig(
        output_dir=str(tmp_path),
        **tiny_training(),
        loss_type=loss_type,
        kpo_q=1e-3,
        kpo_p0=math.inf,
    )
    trainer = KPOTrainer(
        model=model,
        reward_funcs=reward_count_a,
        args=args,
        train_dataset=tiny_prompts(),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs, trainer.state.log_history
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for key in ("kpo/filtered_ratio_mean", "kpo/switch_rate_raw", "kpo/pg_clipfrac"):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    # The second iteration over a batch is off-policy: some raw ratio differs from 1.
    assert any(abs(e["kpo/ratio_std"]) > 0 for e in logs)
    changed = any(
        not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters())
    )
    assert changed, "the weights changed"
    print(
        "\n".join(
            str({k: v for k, v in e.items() if k.startswith(("loss", "kpo/", "reward"))})
            for e in logs
        )
    )


def _config(tmp_path, **kw):
    return KPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("kpo_q", -1.0, ValueError, "kpo_q must be a number >= 0"),
        ("kpo_q", "1e-6", TypeError, "kpo_q must be a real number"),
        ("kpo_r", 0.0, ValueError, "kpo_r must be a finite number > 0"),
        ("kpo_p0", float("nan"), ValueError, "kpo_p0 must be a number >= 0"),
        ("kpo_masked", "skip", ValueError, "kpo_masked must be 'hold' or 'zero'"),
        ("kpo_space", "prob", ValueError, "kpo_space must be one of"),
        ("kpo_grad", "adjoint", ValueError, "kpo_grad must be one of"),
        ("kpo_backend", "cuda", ValueError, "kpo_backend must be one of"),
        ("kpo_loss_name", "ppo", ValueError, "kpo_loss_name must be one of .*got 'ppo'"),
        ("kpo_loss_name", "gmpo", ValueError, "'gmpo' fixes its own aggregation"),
        ("kpo_epsilon_low", 1.0, ValueError, "kpo_epsilon_low must be in"),
        ("kpo_epsilon_high", -0.1, ValueError, "kpo_epsilon_high must be a finite number"),
        ("kpo_epsilon_high", None, TypeError, "kpo_epsilon_high must be a real number"),
    ],
)
def test_config_checks_kpo_fields_when_built(tmp_path, field, value, error, message):
    with pytest.raises(error, match=message) as info:
        _config(tmp_path, **{field: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": "cispo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
        ({"use_adaptive_entropy": True}, "entropy_coef"),
        ({"delta": 2.0, "kpo_loss_name": "kpo"}, "delta .*needs kpo_loss_name='kpo_clipped'"),
        ({"delta": 2.0, "kpo_loss_name": "minpro"}, "delta .*needs kpo_loss_name='kpo_clipped'"),
        ({"kpo_loss_kwargs": {"clip": (0.1, 0.1)}}, "kpo_loss_kwargs is for the table's other"),
        (
            {"kpo_loss_name": "minpro", "kpo_loss_kwargs": {"clip_ratio": 0.2}},
            "kpo_loss_kwargs: loss 'minpro' has no setting 'clip_ratio'",
        ),
        (
            {"kpo_loss_name": "bapo", "kpo_loss_kwargs": {"loss_agg_mode": "token-mean"}},
            "kpo_loss_kwargs cannot set 'loss_agg_mode'",
        ),
        ({"kpo_loss_name": "bapo", "kpo_loss_kwargs": "{target: 1}"}, "not valid JSON"),
        ({"delta": 1.0002}, "delta must be > 1 \\+ kpo_epsilon_high"),
    ],
)
def test_config_refuses_what_kpo_cannot_honour(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **options)


def test_grpo_clip_fields_warn_that_they_do_not_change_kpo(tmp_path):
    with pytest.warns(UserWarning, match="epsilon_high does not change KPO's clip"):
        _config(tmp_path, epsilon_high=0.28)
    with pytest.warns(UserWarning, match="epsilon does not change KPO's clip"):
        _config(tmp_path, epsilon=0.3)
    with pytest.warns(UserWarning, match="epsilon and epsilon_high do not change KPO's clip"):
        _config(tmp_path, epsilon=0.3, epsilon_high=0.28)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*KPO's clip")
        cfg = _config(tmp_path, kpo_q=1e-4, kpo_p0=math.inf, delta=1.5)
    assert cfg.kpo_filter_params.q == 1e-4 and cfg.kpo_filter_params.p0 == math.inf


# --------------------------------------------------------------------------------------------
# Every gain 1: KPOTrainer equals GRPOTrainer

EPS_LOW, EPS_HIGH = 0.2, 0.28
# Each accepted option that changes the loss, alone; "vllm" is TRL's vLLM importance-sampling
# correction (the ratio comes with the batch; set on the trainers, since vLLM is not installed).
OPTIONS = {
    "plain": {},
    "kl": {"beta": 0.1, "use_bias_correction_kl": False},
    "kl_bias_corrected": {"beta": 0.1, "use_bias_correction_kl": True},
    "top_entropy": {"top_entropy_quantile": 0.5},
    "delta": {"delta": 1.35},
    "vllm": {},
    "off_policy_mask": {"off_policy_mask_threshold": 0.02},
    "off_policy_mask_vllm": {"off_policy_mask_threshold": 0.02},
}


def _pair(tmp_path, loss_type, options, kinds=("grpo", "kpo"), **common):
    """A GRPOTrainer and a KPOTrainer with every gain 1, on identical copies of one model (or
    only those of ``kinds``; ``common`` reaches the KPOConfig then)."""
    common = {
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 12,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "save_strategy": "no",
        "loss_type": loss_type,
        **options,
        **common,
    }
    dataset = tiny_prompts()
    # Saved and loaded by path: both trainers start from the same weights, and with beta != 0
    # TRL loads its reference model from there too.
    path = tmp_path / "tiny-llama"
    tiny_llama(len(TINY_VOCAB)).save_pretrained(path)
    trainers = []
    for kind in kinds:
        if kind == "grpo":
            args = GRPOConfig(
                output_dir=str(tmp_path / kind), epsilon=EPS_LOW, epsilon_high=EPS_HIGH, **common
            )
            cls = GRPOTrainer
        else:
            kpo = {"kpo_q": 1e20, "kpo_epsilon_low": EPS_LOW, "kpo_epsilon_high": EPS_HIGH}
            if common.get("kpo_loss_name", "kpo_clipped") not in ("kpo", "kpo_clipped"):
                kpo = {}  # the filter and its clip do not apply
            args = KPOConfig(output_dir=str(tmp_path / kind), **(kpo | common))
            cls = KPOTrainer
        trainers.append(
            cls(
                model=str(path),
                reward_funcs=reward_count_a,
                args=args,
                train_dataset=dataset,
                processing_class=tiny_tokenizer(),
            )
        )
    return trainers


def _inputs(seed, batch=6, prompt=5, time=12):
    """A batch as GRPOTrainer hands it to _compute_loss, with log-ratios of about +-0.3 (so that
    both clip sides, and delta, are reached) and ragged completion lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 1, 7, 12, 3, 9])[:batch]
    completion_mask = (torch.arange(time)[None, :] < lengths[:, None]).long()
    return {
        "prompt_ids": torch.randint(3, len(TINY_VOCAB), (batch, prompt), generator=gen),
        "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
        "completion_ids": torch.randint(3, len(TINY_VOCAB), (batch, time), generator=gen),
        "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=gen),
        "num_items_in_batch": completion_mask.sum() * 2,
        "importance_sampling_ratio": torch.rand(batch, time, generator=gen) + 0.5,
    }


def _with_logps(trainer, inputs, seed):
    """``inputs`` plus old and reference log-probs: the model's own, moved by N(0, 0.3^2)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            inputs["completion_ids"].size(1),
        )
    return inputs | {
        "old_per_token_logps": logps + 0.3 * torch.randn(logps.shape, generator=gen),
        "ref_per_token_logps": logps + 0.3 * torch.randn(logps.shape, generator=gen),
    }


def _in_turn(firsts, seconds):
    """Every ``(first, second)`` pair, the fast tier holding each ``first`` once with the
    ``seconds`` in turn (so every value of both is in it), the other pairs slow: each case builds
    two trainers (a second or two on 2 cores)."""
    return [
        pytest.param(a, b, marks=[] if j == i % len(seconds) else [pytest.mark.slow])
        for i, a in enumerate(firsts)
        for j, b in enumerate(seconds)
    ]


@pytest.mark.parametrize(("option", "loss_type"), _in_turn(list(OPTIONS), SUPPORTED_LOSS_TYPES))
def test_all_gains_one_loss_and_gradients_equal_grpo(tmp_path, loss_type, option):
    grpo, kpo = _pair(tmp_path, loss_type, OPTIONS[option])
    inputs = _with_logps(grpo, _inputs(seed=7), seed=7)
    if option == "off_policy_mask_vllm":  # the engine's log-probs, which the mask then reads
        gen = torch.Generator().manual_seed(8)
        old = inputs["old_per_token_logps"]
        inputs["sampling_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=gen)
    if option.startswith("off_policy_mask"):  # the mask drops some sequences, not all
        kept = grpo.get_off_policy_mask(
            inputs["advantages"][:, None],
            inputs["old_per_token_logps"] - 0.3,  # any logps well away from old: dropped
            inputs.get("sampling_per_token_logps", inputs["old_per_token_logps"]),
            inputs["completion_mask"],
            0.02,
        )
        assert 0 < kept.sum() < kept.numel()
    results = []
    for trainer in (grpo, kpo):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
        if option in ("vllm", "off_policy_mask_vllm"):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    (loss_g, grads_g), (loss_k, grads_k) = results
    assert torch.equal(loss_k, loss_g), (loss_k, loss_g)
    assert all(torch.equal(a, b) for a, b in zip(grads_k, grads_g))
    # the batch reaches the clip regions, and delta's cap when it is set
    assert kpo._metrics["train"]["kpo/pg_clipfrac"][-1] > 0
    if option == "delta":
        assert kpo._metrics["train"]["kpo/dual_clipfrac"][-1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_all_gains_one_training_equals_grpo(tmp_path, loss_type):
    """Two updates per generation batch (the second off-policy), with the KL term (bias-corrected),
    the entropy quantile and delta on: the same losses and the same weights after training."""
    options = {"beta": 0.05, "top_entropy_quantile": 0.5, "delta": 1.5, "num_iterations": 2}
    grpo, kpo = _pair(
        tmp_path, loss_type, options, max_steps=4, learning_rate=5e-3, logging_steps=1
    )
    for trainer in (grpo, kpo):
        set_seed(0)  # the same generations in both runs
        trainer.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (grpo, kpo)]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    for a, b in zip(grpo.model.parameters(), kpo.model.parameters()):
        assert torch.equal(a, b)
    initial = LlamaForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), kpo.model.parameters()))
    assert any(e.get("kpo/pg_clipfrac", 0) > 0 for e in kpo.state.log_history)


# --------------------------------------------------------------------------------------------
# Any loss of kpo_rs.losses

TABLE_LOSSES = [n for n in SUPPORTED_LOSS_NAMES if n not in ("kpo", "kpo_clipped")]
# TRL's aggregation -> the same aggregation in verl's terms (every row non-empty), divided by
# the accumulation steps as TRL divides.
VERL_AGG = {
    "grpo": ("seq-mean-token-mean", {}),
    "bnpo": ("token-mean", {}),
    "dr_grpo": ("seq-mean-token-sum-norm", {"loss_scale_factor": 12}),
    "dapo": ("token-sum", {}),
}


def test_table_losses_are_offered():
    assert {"grpo", "gspo", "dppo_tv", "dppo_kl", "minpro", "bapo"} <= set(TABLE_LOSSES)
    assert "gmpo" not in SUPPORTED_LOSS_NAMES


@pytest.mark.parametrize(("name", "loss_type"), _in_turn(TABLE_LOSSES, SUPPORTED_LOSS_TYPES))
def test_table_loss_aggregated_as_trl(tmp_path, name, loss_type):
    """kpo_loss_name=<name>: the table's loss with its recommended settings, aggregated as TRL's
    loss_type, equals the table's loss called with the same aggregation in verl's terms.

    Tolerance: the two sides sum the same float32 terms (at most 72 tokens) in a different
    association (a weighted token sum against verl's sums and divisions), so they differ by a few
    float32 roundings (eps 6e-8): rtol 2e-6, atol 1e-7 (measured worst over these 28 cases:
    3.1e-7 relative in the loss; the gradients agreed exactly); gradients are compared relative
    to their largest entry."""
    (trainer,) = _pair(tmp_path, loss_type, {}, kinds=("kpo",), kpo_loss_name=name)
    inputs = _with_logps(trainer, _inputs(seed=11), seed=11)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        inputs["completion_ids"].size(1),
    )
    mode, extra = VERL_AGG[loss_type]
    want, _ = get_loss(name)(
        inputs["old_per_token_logps"],
        logps,
        inputs["advantages"][:, None].expand_as(logps),
        inputs["completion_mask"].bool(),
        loss_agg_mode=mode,
        global_batch_info=extra,
    )
    if loss_type == "dapo":  # TRL: tokens of the generation batch, per accumulation window
        want = want / (inputs["num_items_in_batch"] * 2 / trainer.args.steps_per_generation)
    else:
        want = want / 2
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-6, atol=1e-7)
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    assert scale > 0
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=2e-6, atol=1e-7 * scale)
    assert any(k.startswith("kpo/") for k in trainer._metrics["train"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minpro", "bapo"])
def test_peer_losses_train(tmp_path, name):
    """The peers in a real run (two updates per batch, KL on): finite losses, their metrics
    logged, the weights moved."""
    (trainer,) = _pair(
        tmp_path,
        "dapo",
        {"beta": 0.05, "num_iterations": 2},
        kinds=("kpo",),
        kpo_loss_name=name,
        kpo_loss_kwargs={"clip_ratio_c": 10.0},
        max_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    assert all(any(k.startswith(f"kpo/{name}_") for k in e) for e in logs)
    initial = LlamaForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    assert any(
        not torch.equal(a, b) for a, b in zip(initial.parameters(), trainer.model.parameters())
    )


def test_filter_fields_warn_for_other_losses(tmp_path):
    with pytest.warns(UserWarning, match="kpo_q only apply to kpo_loss_name"):
        _config(tmp_path, kpo_loss_name="minpro", kpo_q=1e-3)
    cfg = _config(tmp_path, kpo_loss_name="bapo", kpo_loss_kwargs='{"target": 0.6}')
    assert cfg.kpo_loss_kwargs == {"target": 0.6} and cfg.kpo_loss_spec.name == "bapo"


# --------------------------------------------------------------------------------------------
# vLLM's importance-sampling correction, every mode, through KPOTrainer's own batch preparation

# Recorded rollouts: what vLLM would return for 4 completions of one prompt (token ids of
# TINY_VOCAB, EOS = 1) and its sampling log-probs; None is vLLM's NaN log-prob (TRL: no correction
# there).
RECORDED_COMPLETIONS = [[3, 4, 5, 1], [6, 6, 1], [7, 3, 9, 10, 4, 1], [12, 1]]
RECORDED_SAMPLING_LOGPS = [
    [-2.1, -2.9, -2.4, -2.2],
    [-3.3, -2.0, None],
    [-2.6, -2.3, -3.0, -2.5, -2.0, -2.8],
    [-2.4, -2.7],
]
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IS_MIN, IS_MAX = 0.8, 1.25


def _is_ratio_by_hand(mode, old, sampling, mask):
    """TRL 1.16's vLLM importance-sampling weights, written out from its documentation: the
    token (or, summed over the sequence, sequence) ratio ``exp(old - sampling)`` over valid
    tokens (a NaN sampling log-prob counts 0), truncated to [min, max] or zeroed outside it."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(IS_MIN, IS_MAX)
    return torch.where((ratio < IS_MIN) | (ratio > IS_MAX), 0.0, ratio)


def _recorded_generate(trainer):
    def generate(prompts):
        texts = [trainer.processing_class.decode(c[:-1]) for c in RECORDED_COMPLETIONS]
        prompt_ids = [trainer.processing_class(p)["input_ids"] for p in prompts]
        return (
            prompt_ids,
            [list(c) for c in RECORDED_COMPLETIONS],
            None,
            texts,
            [list(s) for s in RECORDED_SAMPLING_LOGPS],
            {},
            None,
            None,
        )

    return generate


@pytest.mark.slow
@pytest.mark.parametrize("mode", IS_MODES)
def test_vllm_importance_sampling_modes_equal_the_hand_computation(tmp_path, mode):
    """The batch is prepared by KPOTrainer's own ``_generate_and_score_completions`` from recorded
    vLLM output (generation replaced, everything else TRL's: old log-probs, the IS weights of
    ``mode``, rewards, advantages); the policy then moves, and ``_compute_loss`` must equal
    KPO-clipped of :mod:`kpo_rs.losses` at token-mean (``loss_type="bnpo"``) with the hand-made
    IS weights as ``rollout_is_weights``. Float32 throughout: both sides form the same per-token
    terms and sum them in one masked sum each, in orders that may differ, so they agree within a
    few float32 eps of the loss's scale."""
    options = {
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "vllm_importance_sampling_mode": mode,
        "vllm_importance_sampling_clip_min": IS_MIN,
        "vllm_importance_sampling_clip_max": IS_MAX,
    }
    (kpo,) = _pair(tmp_path, "bnpo", options, kinds=("kpo",), kpo_q=1e-2)
    kpo.use_vllm = kpo.vllm_importance_sampling_correction = True
    kpo._generate = _recorded_generate(kpo)
    kpo.model.train()
    batch = kpo._generate_and_score_completions([{"prompt": "abc"}] * 4)
    with torch.no_grad():  # the policy moves away from the one that sampled
        gen = torch.Generator().manual_seed(3)
        for p in kpo.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    kpo.current_gradient_accumulation_steps = 1
    got = kpo._compute_loss(kpo.model, batch)

    mask = batch["completion_mask"]
    sampling = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor([math.nan if x is None else x for x in s]) for s in RECORDED_SAMPLING_LOGPS],
        batch_first=True,
    )
    weights = _is_ratio_by_hand(mode, batch["old_per_token_logps"], sampling, mask)
    torch.testing.assert_close(
        batch["importance_sampling_ratio"], weights, rtol=0, atol=0
    )  # TRL's weights are the documented ones, bit for bit
    with torch.no_grad():
        logps, _, _ = kpo._get_per_token_logps_and_entropies(
            kpo.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], mask], dim=1),
            batch["completion_ids"].size(1),
        )
    want, _ = get_loss("kpo_clipped")(
        batch["old_per_token_logps"],
        logps,
        batch["advantages"][:, None].expand_as(logps),
        mask.bool(),
        clip=(EPS_LOW, EPS_HIGH),
        q=1e-2,
        loss_agg_mode="token-mean",
        rollout_is_weights=weights.expand_as(logps),
    )
    scale = float((batch["advantages"][:, None].abs() * 1.5 * mask).sum() / mask.sum())
    assert abs(float(got.detach()) - float(want)) <= 16 * 2**-23 * max(scale, 1e-6), (got, want)
    # the mode acts: the weights are not all 1, and the masking modes drop something
    assert not torch.equal(weights, torch.ones_like(weights))
    if mode.endswith("mask"):
        assert (weights == 0).any() and not (weights == 0).all()
    assert float(batch["advantages"].abs().sum()) > 0  # rewards differ: the loss is not 0
