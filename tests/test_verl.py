"""verl: the baselines agree with verl's own losses, and the KPO losses plug into upstream verl.

Agreement is checked in float32 on random right-padded batches with rollout weights, for every
aggregation mode a loss honours: loss and gradient to float32 precision (rtol 1e-6: the same
formulas in a possibly different association of sums).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo.core_algos import get_policy_loss_fn

import kpo_rs.integrations.verl as kpo_verl
from helpers import loss_and_grad, verl_actor_config, verl_loss_and_grad
from kpo_rs import losses
from kpo_rs.losses import get_loss

pytestmark = pytest.mark.integration

AGG_MODES = list(losses.LOSS_AGG_MODES)


def _batch(seed, weighted=True, batch=8, time=64, dtype=torch.float32):
    """Right-padded log-probs, per-sequence advantages and rollout weights; the weights are None
    unless ``weighted`` (drawn either way, so the other tensors do not depend on it)."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=gen) * 4
    logp = old + torch.randn(batch, time, generator=gen) * 0.3
    adv = torch.randn(batch, 1, generator=gen).expand(batch, time).contiguous()
    lengths = torch.randint(0, time + 1, (batch,), generator=gen)
    mask = torch.arange(time)[None, :] < lengths[:, None]
    weights = torch.rand(batch, time, generator=gen) + 0.5
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in (old, logp, adv, mask, weights)]
    return tensors if weighted else [*tensors[:4], None]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_ppo_clip_matches_verl_vanilla(mode, seed, weighted):
    old, logp, adv, mask, w = _batch(seed, weighted)
    kw = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    cfg = verl_actor_config(clip_ratio=0.2, loss_agg_mode=mode, **kw)
    theirs = verl_loss_and_grad("vanilla", old, logp, adv, mask, mode=mode, config=cfg, weights=w)
    ours = loss_and_grad(
        losses.ppo_clip_loss, old, logp, adv, mask, loss_agg_mode=mode, rollout_is_weights=w, **kw
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        assert float(ours[2][key]) == pytest.approx(theirs[2][f"actor/{key}"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_gspo_matches_verl(mode, seed, weighted):
    old, logp, adv, mask, w = _batch(seed, weighted)
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode)
    theirs = verl_loss_and_grad("gspo", old, logp, adv, mask, mode=mode, config=cfg, weights=w)
    ours = loss_and_grad(
        losses.gspo_loss, old, logp, adv, mask, loss_agg_mode=mode, rollout_is_weights=w
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


@pytest.mark.parametrize("clip", [0.2, 0.4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_gmpo_matches_verl_geo_mean(clip, seed, weighted):
    old, logp, adv, mask, w = _batch(seed, weighted)
    kw = {"clip_ratio_low": clip, "clip_ratio_high": clip}
    cfg = verl_actor_config(clip_ratio=clip, **kw)
    theirs = verl_loss_and_grad(
        "geo_mean", old, logp, adv, mask, mode="token-mean", config=cfg, weights=w
    )
    ours = loss_and_grad(losses.gmpo_loss, old, logp, adv, mask, rollout_is_weights=w, **kw)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


def test_kpo_losses_are_registered_by_the_plugin_entry_point():
    for name in ("kpo", "kpo_clipped"):
        assert get_policy_loss_fn(name) is getattr(kpo_verl, f"compute_policy_loss_{name}")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_registered_kpo_clipped_through_verl(mode):
    """Called as verl calls it (keywords, a real actor config, global batch info): the same as
    kpo_clipped_loss with the config's clip range, and verl-style float metrics."""
    old, logp, adv, mask, w = _batch(3)
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode)
    cfg.global_batch_info.update(
        {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}
    )
    loss, grad, metrics = verl_loss_and_grad(
        "kpo_clipped", old, logp, adv, mask.float(), mode=mode, config=cfg, weights=w
    )
    want = loss_and_grad(
        losses.kpo_clipped_loss, old, logp, adv, mask, loss_agg_mode=mode, rollout_is_weights=w
    )
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(grad, want[1])
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
    assert "actor/kpo/switch_rate_filtered" in metrics
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_settings_from_the_environment_and_configure(monkeypatch):
    old, logp, adv, mask, _ = _batch(4)
    cfg = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.2)
    fn = get_policy_loss_fn("kpo")
    monkeypatch.setenv("KPO_Q", "0.01")
    monkeypatch.setenv("KPO_P0", "inf")
    loss_env, _ = fn(old, logp, adv, mask, loss_agg_mode="token-mean", config=cfg)
    want, _ = losses.kpo_loss(old, logp, adv, mask, q=0.01, p0=math.inf, loss_agg_mode="token-mean")
    torch.testing.assert_close(loss_env, want)
    kpo_verl.configure(q=1e-3)
    try:
        assert kpo_verl.env_settings()["q"] == 1e-3 and kpo_verl.env_settings()["p0"] == math.inf
    finally:
        kpo_verl.configure()
    assert kpo_verl.env_settings()["q"] == 0.01
    monkeypatch.setenv("KPO_Q", "lots")
    with pytest.raises(ValueError, match="KPO_Q"):
        kpo_verl.env_settings()
    with pytest.raises(TypeError, match="unknown KPO settings"):
        kpo_verl.configure(gamma=1.0)


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("KPO_Q", "-1", "KPO_Q=-1: q must be a number >= 0"),
        ("KPO_Q", "lots", "KPO_Q=lots: q must be a number"),
        ("KPO_R", "0", "KPO_R=0: r must be a finite number > 0"),
        ("KPO_P0", "nan", "KPO_P0=nan: p0 must be"),
        ("KPO_MASKED", "skip", "KPO_MASKED=skip: masked must be 'hold' or 'zero'"),
        ("KPO_SPACE", "prob", "KPO_SPACE=prob: space must be one of"),
        ("KPO_GRAD", "adjoint", "KPO_GRAD=adjoint: grad must be one of"),
        ("KPO_BACKEND", "gpu", "KPO_BACKEND=gpu: backend must be one of"),
    ],
)
def test_bad_environment_value_names_the_variable(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        kpo_verl.env_settings()
    old, logp, adv, mask, _ = _batch(5)
    with pytest.raises(ValueError, match=f"^{var}="):
        get_policy_loss_fn("kpo")(old, logp, adv, mask, loss_agg_mode="token-mean")


def test_configure_checks_values_and_names_the_setting():
    with pytest.raises(ValueError, match=r"configure\(q=-1\): q must be a number >= 0"):
        kpo_verl.configure(q=-1)
    with pytest.raises(ValueError, match=r"configure\(backend='gpu'\): backend must be one of"):
        kpo_verl.configure(backend="gpu")
    assert kpo_verl.env_settings()["q"] == kpo_verl.ENV_VARS["q"][1]  # nothing was set


def test_unknown_kpo_variable_warns_once_and_lists_the_known_ones(monkeypatch):
    monkeypatch.setenv("KPO_QQ", "1e-5")
    monkeypatch.setenv("KPO_VENV", "/somewhere")  # the development scripts' own variable
    monkeypatch.setattr(kpo_verl, "_warned_unknown", set())
    with pytest.warns(UserWarning, match="KPO_QQ") as record:
        kpo_verl.env_settings()
    (warning,) = record
    assert "KPO_VENV" not in str(warning.message)
    assert all(var in str(warning.message) for var, _ in kpo_verl.ENV_VARS.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kpo_verl.env_settings()  # warned once per process


def test_active_settings_are_logged_once_per_process(monkeypatch, capsys):
    old, logp, adv, mask, _ = _batch(6)
    fn = get_policy_loss_fn("kpo")
    monkeypatch.setattr(kpo_verl, "_last_logged", [])
    monkeypatch.setenv("KPO_Q", "1e-4")
    for _ in range(3):
        fn(old, logp, adv, mask, loss_agg_mode="token-mean")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "q=0.0001" in lines[0] and "backend=auto" in lines[0] and "KPO_Q" in lines[0]
    monkeypatch.setenv("KPO_Q", "1e-3")  # a change is logged again
    fn(old, logp, adv, mask, loss_agg_mode="token-mean")
    assert "q=0.001" in capsys.readouterr().err


def test_peer_losses_are_registered():
    assert get_policy_loss_fn("minpro") is kpo_verl.compute_policy_loss_minpro
    assert get_policy_loss_fn("bapo") is kpo_verl.compute_policy_loss_bapo


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", ["minpro", "bapo"])
def test_registered_peers_through_verl(name, mode):
    """Called as verl calls them: the table's loss with the actor's clip range (MinPRO) and dual
    clip (both), verl's aggregation and rollout weights; verl-style float metrics."""
    old, logp, adv, mask, w = _batch(8)
    cfg = verl_actor_config(
        clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode
    )
    loss, grad, metrics = verl_loss_and_grad(
        name, old, logp, adv, mask.float(), mode=mode, config=cfg, weights=w
    )
    overrides = {"clip": (0.2, 0.28)} if name == "minpro" else {}
    want = loss_and_grad(
        get_loss(name),
        old,
        logp,
        adv,
        mask,
        clip_ratio_c=3.0,
        loss_agg_mode=mode,
        rollout_is_weights=w,
        **overrides,
    )
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(grad, want[1])
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
    assert any(k.startswith(f"actor/{name}/") for k in metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


@pytest.mark.slow
def test_plugin_loading_as_the_readme_describes():
    """In a fresh interpreter: verl's entry-point discovery registers the losses; with
    VERL_USE_EXTERNAL_PLUGINS=none verl reports the 'Unsupported loss mode' error of
    docs/integrations/verl.md, and VERL_USE_EXTERNAL_MODULES=kpo_rs.integrations.verl (its fix)
    registers them again."""
    code = (
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "for name in ('kpo', 'kpo_clipped', 'minpro', 'bapo'):\n"
        "    get_policy_loss_fn(name)\n"
    )

    def run(**env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
        return subprocess.run(
            [sys.executable, "-c", code], env=full | env, capture_output=True, text=True
        )

    assert run().returncode == 0
    off = run(VERL_USE_EXTERNAL_PLUGINS="none")
    assert off.returncode != 0 and "Unsupported loss mode: kpo" in off.stderr
    explicit = run(
        VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="kpo_rs.integrations.verl"
    )
    assert explicit.returncode == 0, explicit.stderr[-2000:]


# --- the KPO authors' recipe on upstream verl -----------------------------------------------------

#: The KPO-relevant overrides of the authors' script (shuohe1995/verl-kpo,
#: examples/kpo_trainer/kpo_qwen3_4b.sh), as they are written there, plus what a one-process
#: config needs (rollout.n, batch sizes: the script's own values).
AUTHORS_OVERRIDES = [
    "actor_rollout_ref.actor.policy_loss.loss_mode=kpo",
    "+actor_rollout_ref.actor.is_clip=true",
    "+actor_rollout_ref.actor.kalman_Q=1e-6",
    "+actor_rollout_ref.actor.kalman_R=1",
    "actor_rollout_ref.actor.clip_ratio_low=0.0003",
    "actor_rollout_ref.actor.clip_ratio_high=0.0004",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
]
#: The one line kpo-rs adds to them.
KPO_TARGET = "actor_rollout_ref.actor._target_=kpo_rs.integrations.verl.KPOFSDPActorConfig"


def _compose_actor(overrides):
    """verl's trainer config composed with ``overrides`` by Hydra, as ``verl.trainer.main_ppo``
    does, and its actor config built as verl's workers build it (from its ``_target_``)."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


@pytest.fixture(scope="module")
def authors_actor():
    return _compose_actor([KPO_TARGET, *AUTHORS_OVERRIDES])


def _authors_kpo(old, logp, adv, mask, *, q, r, is_clip, clip, agg, weights=None):
    """The KPO authors' loss (their fork's ``compute_policy_loss_kpo``) written from its
    definition, in float64 with a plain loop: the gains of the random-walk model from P0 = 0,
    clamped to [1e-6, 1 - 1e-6]; the detached log-ratio zeroed at masked positions and filtered
    at every position; ``log rt = logp - sg(logp) + sg(x)`` clamped at 10; PPO's clip when
    ``is_clip``; rollout weights multiplied in; verl's own ``agg_loss``."""
    from verl.trainer.ppo.core_algos import agg_loss

    z = (logp - old).detach().double() * mask.double()
    x = torch.zeros_like(z)
    state, p = torch.zeros(z.shape[0], dtype=torch.float64), 0.0
    for t in range(z.shape[1]):
        prior = p + q
        gain = min(max(prior / (prior + r), 1e-6), 1 - 1e-6)
        p = (1 - gain) * prior
        state = state + gain * (z[:, t] - state)
        x[:, t] = state
    log_rt = torch.clamp(logp - logp.detach() + x.to(logp.dtype), max=10.0)
    rt = torch.exp(log_rt)
    losses_ = -adv * rt
    if is_clip:
        losses_ = torch.maximum(losses_, -adv * torch.clamp(rt, 1 - clip[0], 1 + clip[1]))
    if weights is not None:
        losses_ = losses_ * weights
    return agg_loss(loss_mat=losses_, loss_mask=mask, loss_agg_mode=agg)


def _interior_masked(seed):
    """A batch whose masks also have holes inside the response (multi-turn tool output)."""
    old, logp, adv, mask, w = _batch(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    holes = torch.rand(mask.shape, generator=gen) < 0.15
    return old, logp, adv, mask & ~holes, w


@pytest.mark.parametrize("interior", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_authors_recipe_through_verls_config_gives_the_authors_loss(
    authors_actor, monkeypatch, interior, seed
):
    """The script's overrides plus KPO_TARGET, composed and built by verl, select a loss equal
    (value and gradient) to the authors' on the same tensors. Interior mask holes need
    KPO_MASKED=zero, the authors' handling of masked positions. Tolerance: the filter runs in
    float32 over 64 steps (relative error ~64 * 6e-8 = 4e-6 in the filtered log-ratio, which
    is itself ~1e-3 here), the reference in float64: rtol 1e-5."""
    cfg = authors_actor
    assert (cfg.is_clip, cfg.kalman_Q, cfg.kalman_R) == (True, 1e-6, 1.0)
    old, logp, adv, mask, w = (_interior_masked if interior else _batch)(seed)
    logp = logp + 1.0  # a drift the filter follows, so that the authors' clip bites
    if interior:
        monkeypatch.setenv("KPO_MASKED", "zero")
    fn = get_policy_loss_fn(cfg.policy_loss.loss_mode)
    loss, grad, metrics = loss_and_grad(
        fn,
        old,
        logp,
        adv,
        mask.float(),
        loss_agg_mode=cfg.loss_agg_mode,
        config=cfg,
        rollout_is_weights=w,
    )
    want_loss, want_grad, _ = loss_and_grad(
        lambda **kw: (
            _authors_kpo(
                kw["old_log_prob"],
                kw["log_prob"],
                kw["advantages"],
                kw["response_mask"],
                q=1e-6,
                r=1.0,
                is_clip=True,
                clip=(3e-4, 4e-4),
                agg="seq-mean-token-mean",
                weights=w,
            ),
            {},
        ),
        old,
        logp,
        adv,
        mask.float(),
    )
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    if not interior:
        assert metrics["actor/pg_clipfrac"] > 0  # the authors' clip bites on these ratios


def test_authors_is_clip_false_is_unclipped_kpo(authors_actor):
    cfg = dataclasses.replace(authors_actor, is_clip=False, kalman_Q=1e-5)
    old, logp, adv, mask, _ = _batch(2)
    loss, _ = get_policy_loss_fn("kpo")(old, logp, adv, mask, config=cfg)
    want = _authors_kpo(
        old, logp, adv, mask, q=1e-5, r=1.0, is_clip=False, clip=None, agg="seq-mean-token-mean"
    )
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


def test_authors_fields_without_the_kpo_config_are_refused_by_verl():
    """Without KPO_TARGET verl itself refuses the script's ``+...is_clip`` line;
    docs/integrations/verl.md gives the one-line fix (this pins the message it quotes)."""
    with pytest.raises(Exception, match="unexpected keyword argument 'is_clip'"):
        _compose_actor(AUTHORS_OVERRIDES)


def test_kalman_fields_take_precedence_over_the_environment(authors_actor, monkeypatch, capsys):
    monkeypatch.setenv("KPO_Q", "1e-3")
    monkeypatch.setattr(kpo_verl, "_last_logged", [])
    old, logp, adv, mask, _ = _batch(3)
    loss, _ = get_policy_loss_fn("kpo")(old, logp, adv, mask, config=authors_actor)
    want, _ = losses.kpo_clipped_loss(old, logp, adv, mask, q=1e-6, clip=(3e-4, 4e-4))
    torch.testing.assert_close(loss, want)
    line = capsys.readouterr().err
    assert "verl loss kpo: clip (0.0003, 0.0004), loss_agg_mode seq-mean-token-mean" in line
    assert "q=1e-06" in line and "actor.kalman_Q" in line
    bad = dataclasses.replace(authors_actor, kalman_R=-1.0)
    with pytest.raises(ValueError, match=r"^actor.kalman_R=-1.0: r must be"):
        get_policy_loss_fn("kpo")(old, logp, adv, mask, config=bad)


def test_plain_kpo_warns_once_naming_kpo_clipped(monkeypatch):
    """On verl's own actor config (no is_clip field) ``kpo`` stays KPO without clipping, as in
    kpo_rs.losses, and says once that the authors' ``kpo`` clips."""
    monkeypatch.setattr(kpo_verl, "_warned_once", set())
    old, logp, adv, mask, _ = _batch(4)
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    with pytest.warns(UserWarning, match="loss_mode=kpo_clipped"):
        loss, metrics = get_policy_loss_fn("kpo")(old, logp, adv, mask, config=cfg)
    want, _ = losses.kpo_loss(old, logp, adv, mask)
    torch.testing.assert_close(loss, want)
    assert metrics["actor/pg_clipfrac"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_policy_loss_fn("kpo")(old, logp, adv, mask, config=cfg)


def test_kpo_clipped_with_is_clip_false_is_refused(authors_actor):
    cfg = dataclasses.replace(authors_actor, is_clip=False)
    old, logp, adv, mask, _ = _batch(5)
    with pytest.raises(ValueError, match=r"use loss_mode=kpo$"):
        get_policy_loss_fn("kpo_clipped")(old, logp, adv, mask, config=cfg)


def test_a_ppo_scale_clip_that_cannot_bite_warns(monkeypatch):
    """verl's default clip 0.2 / 0.2 on filtered ratios within ~1e-3 of 1: a warning naming the
    authors' clip; the authors' own clip on the same batch does not warn."""
    monkeypatch.setattr(kpo_verl, "_warned_once", set())
    old, logp, adv, mask, _ = _batch(6)
    with pytest.warns(UserWarning, match="cannot bite.*clip_ratio_low=3e-4"):
        get_policy_loss_fn("kpo_clipped")(old, logp, adv, mask, config=verl_actor_config())
    monkeypatch.setattr(kpo_verl, "_warned_once", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_policy_loss_fn("kpo_clipped")(
            old,
            logp,
            adv,
            mask,
            config=verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
        )


@pytest.mark.slow  # two fresh interpreters importing verl (seconds each)
def test_bad_environment_fails_when_the_plugin_loads():
    """verl imports the plug-in in each worker as it starts: a bad ``KPO_*`` value fails there,
    with the one-line error a call gives, not at the first loss call after a rollout."""
    import subprocess
    import sys

    for var, value, message in (
        ("KPO_Q", "-1", "ValueError: KPO_Q=-1: q must be"),
        ("KPO_BACKEND", "gpu", "ValueError: KPO_BACKEND=gpu: backend must be one of"),
    ):
        env = {**os.environ, var: value}
        done = subprocess.run(
            [sys.executable, "-c", "import kpo_rs.integrations.verl"],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert done.returncode != 0
        assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-500:]


# --- rollout correction and bypass mode ----------------------------------------------------------


def _rollout_batch(seed):
    """A DataProto as verl's trainer holds it: old (proximal) and rollout (engine) log-probs,
    the engine's drawn noisier than the trainer's, right-padded masks, GRPO advantages."""
    from verl.protocol import DataProto

    old, logp, adv, mask, _ = _batch(seed, weighted=False)
    gen = torch.Generator().manual_seed(seed + 7)
    rollout = old + torch.randn(old.shape, generator=gen) * 0.4
    tensors = {
        "old_log_probs": old,
        "rollout_log_probs": rollout,
        "advantages": adv,
        "response_mask": mask.float(),
    }
    return DataProto.from_dict(tensors=tensors), logp


@pytest.mark.parametrize("mode", ["kpo", "kpo_clipped", "minpro", "bapo"])
def test_legacy_bypass_mode_refuses_a_kpo_rs_loss(mode):
    """verl's legacy trainer calls rollout_corr_helper.apply_bypass_mode, which would set
    loss_mode='bypass_mode'; for a kpo-rs loss the plug-in refuses with the fix."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo import rollout_corr_helper

    batch, _ = _rollout_batch(0)
    policy_loss = OmegaConf.create({"loss_mode": mode})
    corr = OmegaConf.create({"bypass_mode": True})
    with pytest.raises(ValueError, match=r"trainer\.use_v1=true.*bypass_mode=false"):
        rollout_corr_helper.apply_bypass_mode(batch, corr, policy_loss)
    assert policy_loss.loss_mode == mode


def test_legacy_bypass_mode_still_works_for_verls_own_losses():
    from omegaconf import OmegaConf
    from verl.trainer.ppo import rollout_corr_helper

    batch, _ = _rollout_batch(1)
    policy_loss = OmegaConf.create({"loss_mode": "vanilla"})
    rollout_corr_helper.apply_bypass_mode(
        batch, OmegaConf.create({"bypass_mode": True}), policy_loss
    )
    assert policy_loss.loss_mode == "bypass_mode"
    assert torch.equal(batch.batch["old_log_probs"], batch.batch["rollout_log_probs"])


def test_v1_bypass_kpo_filters_engine_anchored_log_ratios():
    """verl's v1 bypass mode puts the rollout log-probs in as old_log_probs and keeps the loss:
    KPO-clipped then filters log_prob - rollout_log_prob, the training-inference mismatch
    included."""
    batch, logp = _rollout_batch(2)
    rollout, adv, mask = (
        batch.batch[k] for k in ("rollout_log_probs", "advantages", "response_mask")
    )
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    got = verl_loss_and_grad(
        "kpo_clipped",
        rollout,
        logp,
        adv,
        mask,
        mode="seq-mean-token-mean",
        config=cfg,
        weights=None,
    )
    want = loss_and_grad(losses.kpo_clipped_loss, rollout, logp, adv, mask.bool())
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_decoupled_kpo_with_verls_truncated_is_weights(level):
    """Decoupled mode: verl computes TIS weights pi_old / pi_rollout (truncated at 2) and passes
    them as rollout_is_weights; KPO filters log_prob - old_log_prob and multiplies the weights
    in before aggregating, as verl's own losses do."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

    batch, logp = _rollout_batch(3)
    corr = {"rollout_is": level, "rollout_is_threshold": 2.0}
    batch, _ = compute_rollout_correction_and_add_to_batch(batch, corr)
    w = batch.batch["rollout_is_weights"]
    old, adv, mask = (batch.batch[k] for k in ("old_log_probs", "advantages", "response_mask"))
    assert float(w.max()) <= 2.0 and not torch.all(w == 1)
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    got = verl_loss_and_grad(
        "kpo_clipped", old, logp, adv, mask, mode="seq-mean-token-mean", config=cfg, weights=w
    )
    want = loss_and_grad(losses.kpo_clipped_loss, old, logp, adv, mask.bool(), rollout_is_weights=w)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize(
    ("rs", "threshold"), [("token_k1", "0.7_1.4"), ("seq_mean_k1", "0.97_1.03")]
)
def test_mis_rejection_before_kpo_with_verls_token_mean_denominator(rs, threshold):
    """verl's rejection (MIS) zeroes rejected tokens in response_mask before the loss; with the
    engine's batch_num_tokens (the kept tokens) in global_batch_info, token-mean KPO is the sum
    of kept tokens' losses over the kept-token count, and the filter skips rejected tokens
    (masked='hold')."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

    batch, logp = _rollout_batch(4)
    before = batch.batch["response_mask"].clone()
    batch, _ = compute_rollout_correction_and_add_to_batch(
        batch, {"rollout_rs": rs, "rollout_rs_threshold": threshold}
    )
    old, adv, mask = (batch.batch[k] for k in ("old_log_probs", "advantages", "response_mask"))
    kept = mask.sum()
    assert 0 < kept < before.sum()  # some, not all, tokens were rejected
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    cfg.global_batch_info.update(
        {"dp_size": 1, "batch_num_tokens": kept, "global_batch_size": None}
    )
    loss, _ = get_policy_loss_fn("kpo_clipped")(
        old, logp, adv, mask, loss_agg_mode="token-mean", config=cfg
    )
    tokens, _ = losses.kpo_token_losses(old, logp, adv, mask.bool(), clip=(3e-4, 4e-4))
    torch.testing.assert_close(loss, (tokens * mask).sum() / kept)
