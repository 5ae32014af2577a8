"""Settings fitted online (kpo_rs.online.FilterFitter, q="fit" in the KPO losses)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from kpo_rs.losses import kpo_loss
from kpo_rs.online import FilterFitter
from kpo_rs.params import FilterParams
from kpo_rs.testing import local_level_batches


@settings(deadline=None, max_examples=8)
@given(
    local_level_batches(
        min_batch=64,
        max_batch=64,
        min_time=512,
        max_time=512,
        q_decades=(-4, -2),
        r_decades=(-2, -1),
    )
)
def test_recovers_q_within_a_factor_1_5(batch):
    fitter = FilterFitter(every=1, smoothing=0.5)
    # the losses filter from the prior mean 0: the walk starts at 0, as a log-ratio does
    values = torch.from_numpy(batch.values - batch.params.m0)
    mask = torch.ones(values.shape, dtype=torch.bool)
    for part in values.split(16):  # four batches of 16 rows, four refits
        p = fitter.update(part, mask[: part.shape[0]])
        assert math.isfinite(p.q) and math.isfinite(p.r) and p.q > 0 and p.r > 0
    assert fitter.refits == 4
    assert batch.params.q / 1.5 <= p.q <= batch.params.q * 1.5
    assert batch.params.r / 1.5 <= p.r <= batch.params.r * 1.5


def test_refits_every_n_steps_deterministically():
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(0, 0.01, (32, 256)), 1)
    z = torch.from_numpy(walk + rng.normal(0, 0.1, (32, 256)))
    mask = torch.from_numpy(rng.random((32, 256)) < 0.9)
    a, b = FilterFitter(every=3), FilterFitter(every=3)
    seen = [a.update(z, mask) for _ in range(7)]
    assert a.refits == 3  # steps 0, 3, 6
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5]
    assert b.update(z, mask) == seen[0]  # the same batch gives the same fit
    # with the trainer's step, repeated calls of one step refit once
    c = FilterFitter(every=2)
    for step in (0, 0, 0, 1, 1, 2, 2):
        c.update(z, mask, step=step)
    assert c.refits == 2


def test_flat_fit_falls_back_and_warns_once():
    rng = np.random.default_rng(3)
    white = torch.from_numpy(rng.normal(0, 0.1, (16, 128)))
    mask = torch.ones(white.shape, dtype=torch.bool)
    base = FilterParams(q=1e-6, r=1.0)
    fitter = FilterFitter(base=base, every=1)
    with pytest.warns(UserWarning, match="flat") as record:
        p = fitter.update(white, mask)
        fitter.update(white, mask)
    assert len(record) == 1 and p == base
    assert fitter.update(torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bool)) == base


def test_kpo_loss_q_fit_logs_the_fitted_settings():
    rng = np.random.default_rng(4)
    z = np.cumsum(rng.normal(0, 0.03, (16, 256)), 1) + rng.normal(0, 0.1, (16, 256))
    old = torch.from_numpy(rng.normal(-1, 0.1, z.shape))
    new = old + torch.from_numpy(z)
    adv = torch.ones_like(old)
    mask = torch.ones(z.shape, dtype=torch.bool)
    fitter = FilterFitter(every=1)
    loss, m = kpo_loss(old, new, adv, mask, q="fit", fitter=fitter)
    assert float(m["kpo_fitted_q"]) == pytest.approx(fitter.params.q, rel=1e-6)
    assert float(m["kpo_fitted_r"]) == pytest.approx(fitter.params.r, rel=1e-6)
    want, _ = kpo_loss(old, new, adv, mask, params=fitter.params)
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match="fitter"):
        kpo_loss(old, new, adv, mask, q="fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kpo_loss(old, new, adv, mask, fitter=None)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="every"):
        FilterFitter(every=0)
    with pytest.raises(ValueError, match="smoothing"):
        FilterFitter(smoothing=0.0)
    with pytest.raises(ValueError, match="base: q"):
        FilterFitter(base=FilterParams(q=0.0))


def test_a_batch_without_spread_does_not_use_up_the_refit():
    rng = np.random.default_rng(6)
    z = torch.from_numpy(
        np.cumsum(rng.normal(0, 0.02, (16, 128)), 1) + rng.normal(0, 0.1, (16, 128))
    )
    mask = torch.ones(z.shape, dtype=torch.bool)
    fitter = FilterFitter(every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the zeros are skipped
        assert fitter.update(torch.zeros_like(z), mask) == fitter.base  # on-policy pass: z = 0
        p = fitter.update(z, mask)  # the refit happens here
    assert fitter.refits == 1 and p != fitter.base and fitter.last_refit_step == 1
