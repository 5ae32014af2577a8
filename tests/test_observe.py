"""What the plug-ins observe: premise metrics under each stack's naming, rollout dumps with the
engine's log-probs (KPO_DUMP_DIR), and KPO_Q=fit (integrations/_observe.py)."""

from __future__ import annotations

import pytest
import torch

pq = pytest.importorskip("pyarrow.parquet")

from helpers import requires, verl_actor_config  # noqa: E402
from kpo_rs.integrations import _observe  # noqa: E402
from kpo_rs.integrations._env import filter_settings  # noqa: E402
from kpo_rs.online import FilterFitter  # noqa: E402


def _batch(rows=6, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=g)
    new = old + 0.01 * torch.randn(rows, length, generator=g)
    engine = old + 0.002 * torch.randn(rows, length, generator=g)
    mask = torch.arange(length) < torch.randint(5, length + 1, (rows, 1), generator=g)
    adv = torch.randn(rows, 1, generator=g).expand(rows, length)
    return old, new, adv, mask, engine


@pytest.fixture
def dump_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KPO_DUMP_DIR", str(tmp_path / "dumps"))
    monkeypatch.setenv("KPO_DUMP_EVERY", "1")
    monkeypatch.setenv("KPO_DUMP_ROWS", "4")
    return tmp_path / "dumps"


@requires("verl")
def test_verl_plugin_writes_a_shard_with_the_engine_log_probs(dump_env):
    import kpo_rs.integrations.verl as kpo_verl

    old, new, adv, mask, engine = _batch()
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    _, metrics = kpo_verl.compute_policy_loss_kpo_clipped(
        old, new, adv, mask, config=cfg, rollout_log_probs=engine
    )
    for name in ("kpo_log_ratio_acf1", "kpo_filtered_var_ratio", "kpo_mismatch_acf1"):
        assert f"actor/kpo/{name}" in metrics
    mismatch = (old - engine)[mask]
    assert metrics["actor/kpo/kpo_mismatch_mean"] == pytest.approx(float(mismatch.mean()), 1e-5)
    shards = sorted(dump_env.iterdir())
    assert [s.name for s in shards] == ["step-00000000-rank-00000.parquet"]
    table = pq.read_table(shards[0])
    assert table.num_rows == 4 and table.column("engine_log_prob").null_count == 0
    row = table.column("row")[1].as_py()
    n = table.column("length")[1].as_py()
    got = table.column("engine_log_prob")[1].as_py()
    assert got == pytest.approx(engine[row, :n].tolist(), rel=1e-6)


@requires("verl")
def test_verl_plugin_fits_q_online(monkeypatch):
    import kpo_rs.integrations.verl as kpo_verl

    monkeypatch.setenv("KPO_Q", "fit")
    monkeypatch.setenv("KPO_FIT_EVERY", "2")
    g = torch.Generator().manual_seed(1)
    walk = torch.cumsum(0.02 * torch.randn(16, 256, generator=g, dtype=torch.float64), 1)
    old = torch.full((16, 256), -1.0, dtype=torch.float64)
    new = old + walk + 0.1 * torch.randn(16, 256, generator=g, dtype=torch.float64)
    mask = torch.ones(16, 256, dtype=torch.bool)
    cfg = verl_actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    _, m = kpo_verl.compute_policy_loss_kpo_clipped(
        old, new, torch.ones_like(old), mask, config=cfg
    )
    # the walk's increments have variance 4e-4, the noise 1e-2: the fit is near both
    assert 1e-4 < m["actor/kpo/kpo_fitted_q"] < 1.6e-3
    assert 5e-3 < m["actor/kpo/kpo_fitted_r"] < 2e-2
    monkeypatch.setenv("KPO_FIT_EVERY", "0")
    with pytest.raises(ValueError, match="KPO_FIT_EVERY=0"):
        kpo_verl.compute_policy_loss_kpo_clipped(old, new, torch.ones_like(old), mask, config=cfg)


def test_env_q_fit_gives_the_process_fitter(monkeypatch):
    monkeypatch.setenv("KPO_Q", "fit")
    monkeypatch.setenv("KPO_R", "0.5")
    values = filter_settings()
    assert values["q"] == "fit" and values["r"] == 0.5
    kwargs = _observe.online_kwargs({**values, "clip": None})
    fitter = kwargs["fitter"]
    assert isinstance(fitter, FilterFitter) and fitter.base.r == 0.5 and fitter.every == 10
    assert _observe.online_kwargs({**values, "clip": None})["fitter"] is fitter
    assert "r" not in kwargs and kwargs["q"] == "fit"
    monkeypatch.setenv("KPO_Q", "fitt")
    with pytest.raises(ValueError, match="KPO_Q=fitt"):
        filter_settings()


def test_process_dumper_follows_the_environment(dump_env, monkeypatch):
    d = _observe.process_dumper()
    assert d is not None and d.every == 1 and d.rows == 4
    assert _observe.process_dumper() is d
    monkeypatch.delenv("KPO_DUMP_DIR")
    assert _observe.process_dumper() is None


def test_skyrl_plugin_logs_the_mismatch_and_dumps_the_rollout_log_probs(dump_env):
    from types import SimpleNamespace

    from kpo_rs.integrations.skyrl import kpo_clipped_policy_loss

    old, new, adv, mask, engine = _batch(seed=2)
    config = SimpleNamespace(eps_clip_low=3e-4, eps_clip_high=4e-4, off_policy_correction=None)
    _, metrics = kpo_clipped_policy_loss(new, old, adv, config, mask, engine)
    mismatch = (old - engine)[mask]
    assert metrics["kpo_mismatch_mean"] == pytest.approx(float(mismatch.mean()), rel=1e-5)
    assert "kpo_log_ratio_acf8" in metrics and "kpo_clip_share_neg" in metrics
    (shard,) = dump_env.iterdir()
    assert pq.read_table(shard).column("engine_log_prob").null_count == 0
