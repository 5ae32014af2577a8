"""The demo's inference engine, held-out evaluation, filter arms and their settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import tiny_demo
from kpo_rs.diagnostics import mean_data_weight
from kpo_rs.experiments import demo
from kpo_rs.experiments.config import DemoConfig, arm_settings, parse_filter_arm, parse_mismatch
from kpo_rs.experiments.evaluation import eval_steps, held_out_reward, summarize_evaluations
from kpo_rs.experiments.rollout import Engine, fake_quantize_int8, rewards, student_t3
from kpo_rs.losses import KPO_CLIP
from kpo_rs.params import FilterParams


def _tiny(**kw) -> DemoConfig:
    return tiny_demo(**({"response_len": 12, "eval_every": 2, "eval_per_class": 2} | kw))


def _policy(cfg: DemoConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return demo.TinyPolicy(cfg)


def _sample(mismatch: str, cfg: DemoConfig, keep_tables: bool = False):
    model = _policy(cfg)
    colours = torch.tensor([0, 1, 2, 3, 0, 1])
    gen = torch.Generator().manual_seed(5)
    engine = Engine(mismatch, seed=3)
    return (
        model,
        colours,
        engine.sample(model, colours, cfg.response_len, cfg.vocab, gen, keep_tables),
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
    assert rewards(seqs, torch.tensor([1, 0]), 4).tolist() == [0.75, 0.75]


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


def test_held_out_evaluation_is_balanced_and_uses_its_own_stream():
    cfg = _tiny(eval_per_class=3)
    model = _policy(cfg)
    assert eval_steps(cfg) == [0, 2, 3] and eval_steps(_tiny(steps=4)) == [0, 2, 4]
    first = held_out_reward(model, cfg, seed=0)
    torch.randn(100)  # the global stream does not matter
    assert held_out_reward(model, cfg, seed=0) == first
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
    assert demo.scaled_kpo_clip(base, 128) == pytest.approx(KPO_CLIP, rel=1e-12)
    window = {"q": 1 / 256, "r": 1.0, "p0": 0.0}
    low, high = demo.scaled_kpo_clip(window, 128)
    factor = mean_data_weight(128, **window) / mean_data_weight(128, **base)
    assert (low, high) == pytest.approx((KPO_CLIP[0] * factor, KPO_CLIP[1] * factor))
    assert 0.05 < low < high < 0.2  # a PPO-like band on the drift the filter passes
    low, high = demo.scaled_kpo_clip({"q": 1.0, "r": 1.0, "p0": math.inf}, 4)
    assert low == demo.MAX_KPO_EPS and high == pytest.approx(demo.MAX_KPO_EPS * 4 / 3)


def test_runs_use_the_arms_settings_and_the_fit_replaces_them():
    window = demo.Run(_tiny(filter_arm="window:4"), "kpo_clipped", 0)
    assert window.settings == {"q": 1 / 16, "r": 1.0, "p0": 0.0}
    assert window.band[:2] == pytest.approx(demo.scaled_kpo_clip(window.settings, 12))
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
        run.behaviour, colours, cfg.response_len, cfg.vocab, gen
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
    bypass = demo.Run(_tiny(mismatch="logit-noise:0.5"), "kpo", 0).step(0)
    assert bypass.raw_error == pytest.approx(bypass.mismatch_std, rel=0.2)
    assert bypass.filtered_error < bypass.raw_error  # the 16-token window denoises
    assert demo.Run(_tiny(), "gpg", 0).step(0).filtered_error is None
