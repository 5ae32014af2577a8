"""The demo's inference engine, evaluation, filter arms and their settings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import kpo_rs
from helpers import requires, tiny_demo
from kpo_rs.experiments import demo
from kpo_rs.experiments.colours import ColourTask
from kpo_rs.experiments.config import (
    DemoConfig,
    arm_settings,
    check_correction,
    parse_correction,
    parse_filter_arm,
    parse_mismatch,
)
from kpo_rs.experiments.corrections import CorrectionInputs, apply_correction, dropneg_rule_mask
from kpo_rs.experiments.evaluation import eval_reward, eval_steps, summarize_evaluations
from kpo_rs.experiments.policy import TinyPolicy
from kpo_rs.experiments.rollout import Engine, LogitNoise, fake_quantize_int8, student_t3
from kpo_rs.experiments.variants import MAX_KPO_EPS, scaled_kpo_clip
from kpo_rs.losses import KPO_CLIP
from kpo_rs.params import FilterParams


def _tiny(**kw) -> DemoConfig:
    return tiny_demo(**({"response_len": 12, "eval_every": 2, "eval_per_class": 2} | kw))


def _policy(cfg: DemoConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyPolicy(cfg)


def _sample(mismatch: str, cfg: DemoConfig, keep_tables: bool = False):
    model = _policy(cfg)
    colours = torch.tensor([0, 1, 2, 3, 0, 1])
    gen = torch.Generator().manual_seed(5)
    engine = Engine(mismatch, seed=3)
    return (
        model,
        colours,
        engine.sample(
            model, (cfg.vocab + colours).unsqueeze(1), cfg.response_len, cfg.vocab, gen, keep_tables
        ),
    )


@pytest.mark.parametrize("mismatch", ["none", "logit-noise:0.5", "bf16", "int8"])
def test_the_recorded_log_probs_are_those_the_engine_sampled_from(mismatch):
    cfg = _tiny()
    _, colours, (seqs, logps, tables) = _sample(mismatch, cfg, keep_tables=True)
    assert seqs.shape == (6, 1 + cfg.response_len) and logps.shape == (6, cfg.response_len)
    assert torch.equal(seqs[:, 0], cfg.vocab + colours)
    stacked = torch.stack(tables, dim=1)  # [batch, time, vocab]
    # Each recorded log-prob is its table's entry at the sampled token, exactly.
    assert torch.equal(logps, stacked.gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1))
    # Each table is a normalised distribution, and the tokens are the draws from those tables
    # with the sampling stream (replayed: the same generator gives the same tokens).
    assert torch.allclose(stacked.exp().sum(-1), torch.ones(6, cfg.response_len), atol=1e-5)
    gen = torch.Generator().manual_seed(5)
    replay = [torch.multinomial(t.exp(), 1, generator=gen) for t in tables]
    assert torch.equal(torch.cat(replay, dim=1), seqs[:, 1:])


def test_without_mismatch_the_engine_is_the_trainer():
    cfg = _tiny()
    model, _, (seqs, logps, _) = _sample("none", cfg)
    trainer = demo._token_logps(model, seqs)
    # Incremental decoding with a key/value cache against one full forward pass, float32.
    assert torch.allclose(logps, trainer, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mismatch", ["logit-noise:0.5", "bf16", "int8"])
def test_every_mismatch_moves_the_engine_log_probs_off_the_trainers(mismatch):
    cfg = _tiny()
    model, _, (seqs, logps, _) = _sample(mismatch, cfg)
    with torch.no_grad():
        gap = (logps - demo._token_logps(model, seqs)).abs()
    assert float(gap.max()) > 1e-4, mismatch


def test_logit_noise_scales_and_zero_noise_is_no_mismatch():
    cfg = _tiny()
    _, _, (s0, l0, _) = _sample("none", cfg)
    _, _, (s1, l1, _) = _sample("logit-noise:0", cfg)
    assert torch.equal(s0, s1) and torch.equal(l0, l1)
    model, _, (sa, la, _) = _sample("logit-noise:0.1", cfg)
    _, _, (sb, lb, _) = _sample("logit-noise:1", cfg)
    with torch.no_grad():
        small = (la - demo._token_logps(model, sa)).std()
        large = (lb - demo._token_logps(model, sb)).std()
    assert float(large) > 3 * float(small)


@requires("scipy")
def test_student_t3_has_the_t3_distribution():
    from scipy import stats

    x = student_t3((20000,), torch.Generator().manual_seed(1)).numpy().astype(np.float64)
    # Kolmogorov-Smirnov against scipy's t(3): a fixed seed, so the p-value is fixed too; a
    # wrong distribution (a normal, or t with another degree of freedom) gives p < 1e-6 here.
    assert stats.kstest(x, "t", args=(3,)).pvalue > 0.01
    assert stats.kstest(x, "norm").pvalue < 1e-6


def test_int8_fake_quantisation_puts_every_weight_on_its_channel_grid():
    cfg = _tiny()
    model = _policy(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake_quantize_int8(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w0 = before[f"{name}.weight"]
            scale = w0.abs().amax(dim=1, keepdim=True) / 127
            levels = module.weight / scale
            assert torch.allclose(levels, levels.round(), atol=1e-3)
            assert float((module.weight - w0).abs().max()) <= float(scale.max()) / 2 + 1e-7
            assert torch.equal(module.bias, before[f"{name}.bias"])  # only weights


def test_rewards_count_the_prompts_colour():
    seqs = torch.tensor([[17, 1, 5, 2, 9], [16, 0, 4, 8, 3]])  # colours 1 and 0, classes 4
    cfg = DemoConfig(classes=4, vocab=16)
    assert ColourTask().reward(cfg, seqs, torch.tensor([1, 0])).tolist() == [0.75, 0.75]


def test_parsing_arms_and_mismatches():
    assert parse_filter_arm(" window:16.0 ") == "window:16" and parse_filter_arm("fit") == "fit"
    assert arm_settings("window:16") == {"q": 1 / 256, "r": 1.0} and arm_settings("fit") == {}
    assert parse_mismatch("logit-noise:0.50") == "logit-noise:0.5"
    for bad, match in (
        ("window:0.5", "window must be >= 1"),
        ("window:x", "expected a number"),
        ("kalman", "unknown filter arm 'kalman'; choose from authors, window:W, fit"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_filter_arm(bad)
    for bad, match in (("logit-noise:-1", "scale must be >= 0"), ("fp8", "unknown mismatch")):
        with pytest.raises(ValueError, match=match):
            parse_mismatch(bad)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tis": 2.0}, "need old_logp='trainer'"),
        ({"old_logp": "trainer", "tis": 0.0}, "tis must be a finite cap > 0"),
        ({"old_logp": "sampler"}, "old_logp must be one of engine, trainer"),
        ({"filter_arm": "fit", "q": 1e-3}, "q: the fit arm fits q"),
        ({"filter_arm": "fit", "fit_steps": 3}, "must be below steps"),
        ({"q": -1.0}, "q: "),
        ({"eval_every": 0}, "eval_every must be >= 1"),
    ],
)
def test_demo_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw).validate()


def test_the_evaluation_is_balanced_and_uses_its_own_stream():
    cfg = _tiny(eval_per_class=3)
    model = _policy(cfg)
    assert eval_steps(cfg) == [0, 2, 3] and eval_steps(_tiny(steps=4)) == [0, 2, 4]
    first = eval_reward(model, cfg, seed=0)
    torch.randn(100)  # the global stream does not matter
    assert eval_reward(model, cfg, seed=0) == first
    assert 0.0 <= first <= 1.0


def _plain_summary(steps, values, threshold, drop, length):
    """The evaluation figures by the definitions, written out plainly."""
    area = sum(
        (values[i] + values[i + 1]) / 2 * (steps[i + 1] - steps[i]) for i in range(len(steps) - 1)
    )
    reached = [s for s, v in zip(steps, values) if v >= threshold]
    collapses, below = 0, 0
    for i, v in enumerate(values):
        below = below + 1 if v < max(values[: i + 1]) - drop else 0
        if below == length:
            collapses += 1
    return area / (steps[-1] - steps[0]), (reached[0] if reached else -1), collapses


@pytest.mark.parametrize(
    "values",
    [
        [0.25, 0.3, 0.6, 0.7, 0.4, 0.4, 0.4, 0.8, 0.5, 0.5, 0.5],  # one collapse, then another
        [0.25, 0.26, 0.24, 0.3, 0.31, 0.3, 0.29, 0.28, 0.3, 0.3, 0.33],  # never reaches 0.5
        [0.25, 0.9, 0.7, 0.9, 0.7, 0.9, 0.7, 0.9, 0.7, 0.9, 0.7],  # never 3 evaluations down
    ],
)
def test_evaluation_figures_match_their_definitions(values):
    cfg = _tiny(steps=50, eval_every=5)
    steps = eval_steps(cfg)
    got = summarize_evaluations(steps, values, cfg)
    auc, reached, collapses = _plain_summary(steps, values, 0.5, 0.15, 3)
    assert got["eval_auc"] == pytest.approx(auc, abs=1e-12)
    assert got["eval_steps_to_threshold"] == reached
    assert got["eval_collapses"] == collapses and got["eval_final"] == values[-1]


def test_the_clip_band_scales_with_the_data_weight():
    authors = FilterParams()
    base = {"q": authors.q, "r": authors.r, "p0": authors.p0}
    assert scaled_kpo_clip(base, 128) == pytest.approx(KPO_CLIP, rel=1e-12)
    window = {"q": 1 / 256, "r": 1.0, "p0": 0.0}
    low, high = scaled_kpo_clip(window, 128)

    # the mean data weight from the filter itself, not the formula the band is computed with:
    # zeros filtered from m0 = 1 keep the weight still on the prior
    def weight(settings: dict) -> float:
        return 1.0 - float(kpo_rs.kalman_filter(np.zeros((1, 128)), m0=1.0, **settings).mean())

    factor = weight(window) / weight(base)
    assert (low, high) == pytest.approx((KPO_CLIP[0] * factor, KPO_CLIP[1] * factor))
    assert 0.05 < low < high < 0.2  # a PPO-like band on the drift the filter passes
    low, high = scaled_kpo_clip({"q": 1.0, "r": 1.0, "p0": math.inf}, 4)
    assert low == MAX_KPO_EPS and high == pytest.approx(MAX_KPO_EPS * 4 / 3)


@pytest.mark.slow  # a training run of four steps with its evaluations
def test_runs_use_the_arms_settings_and_the_fit_replaces_them():
    window = demo.Run(_tiny(filter_arm="window:4", band="rescaled"), "kpo_clipped", 0)
    assert window.settings == {"q": 1 / 16, "r": 1.0, "p0": 0.0}
    assert window.band[:2] == pytest.approx(scaled_kpo_clip(window.settings, 12))
    assert demo.Run(_tiny(), "grpo", 0).settings is None
    cfg = _tiny(filter_arm="fit", fit_steps=2, steps=4, mismatch="logit-noise:1")
    logs, run = demo.train(cfg, "kpo", 0)
    assert run.fitted is not None and run.settings["q"] == run.fitted["q"] != FilterParams().q
    assert logs[0].data_weight == logs[1].data_weight != logs[2].data_weight
    assert [s for s, _ in run.evaluations] == eval_steps(cfg)


def _capture(monkeypatch) -> list[dict]:
    """Records the tensors every loss call of the demo receives."""
    calls: list[dict] = []
    real = demo.loss_function

    def wrapped(name, **overrides):
        fn = real(name, **overrides)

        def loss(old, new, adv, mask, **extra):
            calls.append({"old": old.detach().clone(), **extra})
            return fn(old, new, adv, mask, **extra)

        return loss

    monkeypatch.setattr(demo, "loss_function", wrapped)
    return calls


def test_bypass_gives_the_loss_the_engines_log_probs(monkeypatch):
    calls = _capture(monkeypatch)
    cfg = _tiny(mismatch="logit-noise:0.5", old_logp="engine", minibatches=1, steps=1)
    run = demo.Run(cfg, "grpo", 0)
    gen_state = run.gen.get_state()
    log = run.step(0)
    # Replay the step's sampling: the loss saw the engine's recorded log-probs as old_log_prob.
    gen = torch.Generator()
    gen.set_state(gen_state)
    colours = torch.randint(0, cfg.classes, (cfg.prompts_per_step,), generator=gen)
    colours = colours.repeat_interleave(cfg.group_size)
    seqs, engine_logp, _ = Engine(cfg.mismatch, 0).sample(
        run.behaviour, (cfg.vocab + colours).unsqueeze(1), cfg.response_len, cfg.vocab, gen
    )
    order = torch.randperm(seqs.shape[0], generator=gen)
    assert torch.equal(calls[0]["old"], engine_logp[order])
    trainer = demo._token_logps(run.behaviour, seqs)
    assert log.mismatch_std == pytest.approx(
        float((engine_logp - trainer).double().std(correction=0)), rel=1e-4
    )
    assert "rollout_is_weights" not in calls[0]


def test_decoupled_with_tis_passes_truncated_weights(monkeypatch):
    calls = _capture(monkeypatch)
    cfg = _tiny(mismatch="logit-noise:0.5", old_logp="trainer", tis=1.5, minibatches=1, steps=1)
    run = demo.Run(cfg, "kpo", 0)
    run.step(0)
    (call,) = calls
    weights = call["rollout_is_weights"]
    assert float(weights.max()) <= 1.5 and float(weights.max()) == 1.5  # the cap binds
    # The trainer's old log-probs: the true log-ratio's anchor, so the raw error is 0.
    seqs_old = call["old"]
    assert seqs_old.shape == weights.shape
    no_tis = _capture(monkeypatch)
    demo.Run(
        _tiny(mismatch="logit-noise:0.5", old_logp="trainer", minibatches=1, steps=1), "kpo", 0
    ).step(0)
    assert torch.equal(no_tis[0]["old"], call["old"]) and "rollout_is_weights" not in no_tis[0]


def test_errors_are_measured_against_the_true_log_ratio():
    trainer = demo.Run(_tiny(mismatch="logit-noise:0.5", old_logp="trainer"), "kpo", 0).step(0)
    assert trainer.raw_error == 0.0 and trainer.filtered_error > 0
    bypass = demo.Run(_tiny(mismatch="logit-noise:0.5", filter_arm="window:16"), "kpo", 0).step(0)
    assert bypass.raw_error == pytest.approx(bypass.mismatch_std, rel=0.2)
    assert bypass.filtered_error < bypass.raw_error  # the 16-token window denoises
    assert demo.Run(_tiny(), "gpg", 0).step(0).filtered_error is None


# --------------------------------------------------------------------------------------------
# Structured engines


def _noise(kind: str, params: tuple[float, ...], batch: int, steps: int, vocab: int = 16):
    """``steps`` draws of :class:`LogitNoise` ``[steps, batch, vocab]`` and the burst states
    ``[steps, batch]``."""
    noise = LogitNoise(kind, params, batch, vocab, torch.Generator().manual_seed(7))
    draws, bursts = [], []
    for _ in range(steps):
        draws.append(noise.next().clone())
        bursts.append(noise.in_burst.clone())
    return torch.stack(draws).double(), torch.stack(bursts)


def _lag1_along_time(x: torch.Tensor) -> float:
    """The lag-1 autocorrelation of ``x`` ``[time, ...]`` along time, pooled (a plain loop over
    the series would give the same: one numerator and one denominator over all of them)."""
    c = x - x.mean()
    return float((c[1:] * c[:-1]).sum() / (c * c).sum())


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("logit-noise-ar1:0.25:0.90", "logit-noise-ar1:0.25:0.9"),
        (" offset:0.4 ", "offset:0.4"),
        ("bursts:0.5:0.020:16", "bursts:0.5:0.02:16"),
        ("logit-noise:0.25", "logit-noise:0.25"),
    ],
)
def test_structured_mismatches_parse_to_one_canonical_form(text, canonical):
    assert parse_mismatch(text) == canonical


@pytest.mark.parametrize(
    "bad, match",
    [
        ("logit-noise-ar1:0.25", "expected logit-noise-ar1:S:RHO"),
        ("logit-noise-ar1:0.25:1", "RHO must be in"),
        ("offset:-1", "scale S must be >= 0"),
        ("bursts:0.5:0:16", "P must be in"),
        ("bursts:0.5:0.1:0.5", "L must be >= 1"),
        ("bursts:0.5:x:16", "P: expected a number"),
    ],
)
def test_bad_structured_mismatches_name_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match) as exc:
        parse_mismatch(bad)
    assert "\n" not in str(exc.value) and bad in str(exc.value)


def test_ar1_noise_has_lag1_rho_and_the_white_variance():
    x, _ = _noise("logit-noise-ar1", (0.5, 0.9), batch=64, steps=400)
    # Per logit, an AR(1) along the response: the lag-1 autocorrelation of the noise itself is
    # RHO (sampling error about sqrt((1 - RHO^2) / n) ~ 1e-3 for n = 400 x 64 x 16 draws; 0.02
    # allows the t3 innovations' heavier tails).
    assert _lag1_along_time(x) == pytest.approx(0.9, abs=0.02)
    # The same stationary variance as the white form: S^2 x 3 (t3's variance), within the
    # sampling error of a heavy-tailed variance (10%).
    white, _ = _noise("logit-noise", (0.5,), batch=64, steps=400)
    assert float(x.var()) == pytest.approx(0.25 * 3, rel=0.1)
    assert float(white.var()) == pytest.approx(0.25 * 3, rel=0.1)
    assert abs(_lag1_along_time(white)) < 0.01


def test_offset_noise_is_constant_within_a_response_and_differs_between_responses():
    x, _ = _noise("offset", (0.4,), batch=256, steps=12)
    assert torch.equal(x, x[:1].expand_as(x))  # every token of a response: the same bias
    assert float(x[0].std()) == pytest.approx(0.4, rel=0.05)  # N(0, 0.4^2) per entry
    assert float(x[0, 0].sub(x[0, 1]).abs().max()) > 0


def test_bursts_have_the_run_lengths_start_rate_and_quiet_tokens_asked_for():
    p, length = 0.05, 8.0
    x, bursts = _noise("bursts", (0.5, p, length), batch=256, steps=240, vocab=4)
    # Outside a burst the logits are clean; inside every logit is perturbed.
    assert torch.equal(x[~bursts], torch.zeros_like(x[~bursts]))
    assert bool((x[bursts] != 0).all())
    b = bursts.numpy()
    runs = []
    for row in b.T:  # each response: the lengths of its finished runs (open ones are censored)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        begins, ends = edges[::2], edges[1::2]
        runs += [int(e - s) for s, e in zip(begins, ends) if e < len(row)]
    before, after = b[:-1], b[1:]
    starts, outside = int((~before & after).sum()), int((~before).sum())
    # Geometric run lengths of mean L; a start with probability P per token outside a burst
    # (thousands of runs: 5% covers their sampling error).
    assert np.mean(runs) == pytest.approx(length, rel=0.05)
    assert starts / outside == pytest.approx(p, rel=0.05)
    # The first token is in a burst with the chain's stationary probability P L / (1 + P L).
    assert b[0].mean() == pytest.approx(p * length / (1 + p * length), abs=0.06)


@pytest.mark.parametrize("mismatch", ["logit-noise-ar1:0.5:0.9", "offset:0.5", "bursts:1:0.2:4"])
def test_structured_engines_record_the_log_probs_they_sampled_from(mismatch):
    cfg = _tiny()
    model, _, (seqs, logps, tables) = _sample(mismatch, cfg, keep_tables=True)
    stacked = torch.stack(tables, dim=1)
    assert torch.equal(logps, stacked.gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1))
    with torch.no_grad():
        assert float((logps - demo._token_logps(model, seqs)).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------------
# Corrections and controls, each against a plain loop


def _inputs(bypass: bool = True, seed: int = 0, batch: int = 6, time: int = 20):
    g = torch.Generator().manual_seed(seed)
    engine = -1.5 + 0.3 * torch.randn(batch, time, generator=g, dtype=torch.float64)
    trainer = engine + 0.3 * torch.randn(batch, time, generator=g, dtype=torch.float64) - 0.3
    current = trainer + 0.05 * torch.randn(batch, time, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, 1, generator=g, dtype=torch.float64).expand(batch, time)
    mask = torch.ones(batch, time, dtype=torch.bool)
    mask[0, 15:] = False  # a shorter response
    return CorrectionInputs(current, engine, trainer, adv, mask, length=128, bypass=bypass)


@pytest.mark.parametrize("bypass", [True, False])
def test_rs_geo_rejects_the_responses_verl_rejects(bypass):
    inputs = _inputs(bypass)
    for low, high in ((0.999, 1.001), (0.8, 1.02)):
        mask, weights = apply_correction(f"rs-geo:{low}:{high}", inputs, torch.Generator())
        assert weights is None
        reference = inputs.current if bypass else inputs.trainer
        for i in range(inputs.mask.shape[0]):
            valid = [t for t in range(inputs.mask.shape[1]) if inputs.mask[i, t]]
            stat = sum(-(float(reference[i, t]) - float(inputs.engine[i, t])) for t in valid)
            stat /= len(valid)
            keep = math.log(low) <= stat <= math.log(high)
            assert mask[i].tolist() == [keep and bool(inputs.mask[i, t]) for t in range(20)]
    # verl's default band: +-0.1% on the geometric mean ratio.
    default, _ = apply_correction("rs-geo", inputs, torch.Generator())
    explicit, _ = apply_correction("rs-geo:0.999:1.001", inputs, torch.Generator())
    assert torch.equal(default, explicit)


def test_seq_mask_and_icepop_weights_match_trl_and_verl_rules():
    inputs = _inputs(bypass=False)
    mask, seq = apply_correction("seq-mask:0.5:2", inputs, torch.Generator())
    assert torch.equal(mask, inputs.mask)
    _, ice = apply_correction("icepop", inputs, torch.Generator())
    for i in range(6):
        total = sum(
            float(inputs.trainer[i, t] - inputs.engine[i, t])
            for t in range(20)
            if inputs.mask[i, t]
        )
        w = math.exp(total)
        for t in range(20):
            valid = bool(inputs.mask[i, t])
            expected = w if (0.5 <= w <= 2 and valid) else 0.0
            assert float(seq[i, t]) == pytest.approx(expected, rel=1e-6)
            r = math.exp(float(inputs.trainer[i, t] - inputs.engine[i, t]))
            expected = r if (0.5 <= r <= 5 and valid) else 0.0
            assert float(ice[i, t]) == pytest.approx(expected, rel=1e-6)
    # TRL's default: cap 3, no lower bound.
    _, default = apply_correction("seq-mask", inputs, torch.Generator())
    _, explicit = apply_correction("seq-mask:0:3", inputs, torch.Generator())
    assert torch.equal(default, explicit)


def _rule_by_loop(inputs: CorrectionInputs, window: float) -> np.ndarray:
    """The rescaled-band window:W log-space KPO-clipped rule's clipped negative tokens, by the
    numpy filter row by row."""
    settings = {"p0": 0.0, **arm_settings(f"window:{window:g}")}
    low, _ = scaled_kpo_clip(settings, inputs.length)
    out = np.zeros(tuple(inputs.mask.shape), dtype=bool)
    for i in range(inputs.mask.shape[0]):
        n = int(inputs.mask[i].sum())
        z = (inputs.current[i, :n] - inputs.engine[i, :n]).numpy()
        x = kpo_rs.kalman_filter(z[None], q=settings["q"], r=1.0, p0=0.0)[0]
        for t in range(n):
            out[i, t] = math.exp(x[t]) < 1 - low and float(inputs.advantages[i, t]) < 0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropneg_random_drops_exactly_as_many_negative_tokens_as_the_rule_clips(seed):
    inputs = _inputs(seed=seed)
    rule = dropneg_rule_mask(inputs, 16)
    assert np.array_equal(rule.numpy(), _rule_by_loop(inputs, 16))
    assert int(rule.sum()) > 0  # the offset puts the filtered ratio below the band
    gen = torch.Generator().manual_seed(seed)
    mask, weights = apply_correction("dropneg-random", inputs, gen)
    dropped = (weights == 0) & inputs.mask
    assert torch.equal(mask, inputs.mask)
    assert int(dropped.sum()) == int(rule.sum())  # the same rate, token for token
    assert bool((inputs.advantages[dropped] < 0).all())  # negative advantages only
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    # The places are random: another stream picks other tokens (same count).
    _, other = apply_correction("dropneg-random", inputs, torch.Generator().manual_seed(99))
    assert int((other == 0).sum()) == int((weights == 0).sum())


def test_dropneg_seq_drops_the_negative_tokens_of_responses_below_the_band():
    inputs = _inputs(seed=3)
    _, weights = apply_correction("dropneg-seq:16", inputs, torch.Generator())
    low, _ = scaled_kpo_clip({"p0": 0.0, **arm_settings("window:16")}, 128)
    for i in range(6):
        n = int(inputs.mask[i].sum())
        mean = float((inputs.current[i, :n] - inputs.engine[i, :n]).mean())
        drop = mean < math.log(1 - low) and float(inputs.advantages[i, 0]) < 0
        assert weights[i, :n].tolist() == [0.0 if drop else 1.0] * n
    assert bool((weights == 0).any()) and bool((weights == 1).any())


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("rs-geo", "rs-geo"),
        ("rs-geo:0.99:1.01", "rs-geo:0.99:1.01"),
        ("seq-mask:3", "seq-mask:3"),
        ("icepop:0.5:5.0", "icepop:0.5:5"),
        ("dropneg-random:8", "dropneg-random:8"),
        ("none", None),
    ],
)
def test_corrections_parse(text, canonical):
    assert parse_correction(text) == canonical


@pytest.mark.parametrize(
    "bad, match",
    [
        ("tis:2", "unknown correction"),
        ("icepop:5:0.5", "LOW < HIGH"),
        ("rs-geo:0:1", "LOW must be > 0"),
        ("dropneg-seq:0.5", "window W >= 1"),
        ("seq-mask:x", "expected a number"),
    ],
)
def test_bad_corrections_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match) as exc:
        parse_correction(bad)
    assert "\n" not in str(exc.value)


def test_corrections_need_their_mode():
    with pytest.raises(ValueError, match="needs old_logp=trainer"):
        check_correction("icepop", "engine", None)
    with pytest.raises(ValueError, match="replace tis"):
        check_correction("seq-mask", "trainer", 2.0)
    with pytest.raises(ValueError, match="needs old_logp=engine"):
        check_correction("dropneg-seq", "trainer", None)
    check_correction("rs-geo", "trainer", 2.0)  # verl allows rejection with IS weights


def _ppo_removed(calls, cfg) -> tuple[float, float]:
    """The shares of positive / negative advantage tokens GRPO's clip (0.2) and dual clip (3)
    remove, by the rule, from the tensors the loss received."""
    pos = neg = n_pos = n_neg = 0
    for call in calls:
        ratio = torch.exp(call["new"] - call["old"])
        adv = call["adv"]
        pos += int(((adv > 0) & (ratio > 1.2)).sum())
        neg += int(((adv < 0) & ((ratio < 0.8) | (ratio > 3.0))).sum())
        n_pos, n_neg = n_pos + int((adv > 0).sum()), n_neg + int((adv < 0).sum())
    return pos / n_pos, neg / n_neg


def test_removed_gradient_shares_are_the_clip_rules_by_advantage_sign(monkeypatch):
    calls: list[dict] = []
    real = demo.loss_function

    def wrapped(name, **overrides):
        fn = real(name, **overrides)

        def loss(old, new, adv, mask, **extra):
            calls.append({"old": old.detach(), "new": new.detach(), "adv": adv.detach()})
            return fn(old, new, adv, mask, **extra)

        return loss

    monkeypatch.setattr(demo, "loss_function", wrapped)
    cfg = _tiny(mismatch="logit-noise:1", lag=2, steps=1)
    log = demo.Run(cfg, "grpo", 0).step(0)
    pos, neg = _ppo_removed(calls, cfg)
    assert log.clip_share_pos == pytest.approx(pos, abs=1e-12)
    assert log.clip_share_neg == pytest.approx(neg, abs=1e-12)
    assert 0 < log.clip_share_pos < 1 and 0 < log.clip_share_neg < 1
    # gpg removes nothing.
    plain = demo.Run(cfg, "gpg", 0).step(0)
    assert plain.clip_share_pos == 0 and plain.clip_share_neg == 0


@pytest.mark.slow
def test_the_dropneg_controls_remove_negative_advantage_gradients_only():
    # (64 tokens: the band of a 16-token window is (0.27, 0.35) there, below the offset.)
    cfg = _tiny(mismatch="logit-noise:1", lag=2, steps=1, response_len=64)
    for correction in ("dropneg-seq:16", "dropneg-random:16"):
        log = demo.Run(dataclasses.replace(cfg, correction=correction), "gpg", 0).step(0)
        assert log.clip_share_pos == 0 and log.clip_share_neg > 0, correction


def test_a_step_records_the_engines_mean_kl_and_the_unit_error():
    log = demo.Run(_tiny(mismatch="logit-noise:0.5"), "gpg", 0).step(0)
    # engine - trainer averages to about KL(engine||trainer) >= 0; the exact KL agrees with the
    # Monte Carlo estimate to its sampling error (128 tokens: about std / sqrt(128) ~ 0.05).
    assert log.mismatch_kl > 0 and log.mismatch_mean == pytest.approx(log.mismatch_kl, abs=0.1)
    # Bypass: the log-ratio the loss sees carries about -KL as offset.
    assert log.log_ratio_mean < 0
    assert log.unit_error >= 0 and log.raw_error > 0


def test_a_minibatch_whose_every_token_is_rejected_makes_no_update():
    # verl's default geometric-mean band (+-0.1%) rejects every answer of a noisy engine: the
    # loss has no token to average over (0 / 0), so the lab makes no update at all.
    cfg = _tiny(mismatch="logit-noise:1", correction="rs-geo")
    run = demo.Run(cfg, "grpo", 0)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    log = run.step(0)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert log.clip_share_pos == 1.0 and log.clip_share_neg == 1.0
    assert math.isfinite(log.policy_loss) and log.grad_norm == 0.0
