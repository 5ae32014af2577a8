"""The peers (DPPO, MinPRO, BAPO) and the control GPG: DPPO and GPG against verl's own losses,
MinPRO and BAPO against plain per-token references, gradients by gradcheck, BAPO's search across
data-parallel ranks.

Tolerances. Against verl in float32: rtol 1e-6, atol 1e-7 (the same formulas, possibly another
association of the sums; as tests/test_verl.py). Against verl in float64: rtol 1e-12, atol 1e-14
(the same operations; only the order of the final sums can differ). Against the plain references
in float64: rtol 1e-10, atol 1e-12 (the references sum token by token in Python; a length-12 row
of O(10) terms loses at most ~1e-14 relative). gradcheck: torch's float64 defaults.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import loss_and_grad, requires, verl_actor_config, verl_loss_and_grad
from kpo_rs import losses
from kpo_rs.losses import _common, baselines, get_loss, peers

AGG_MODES = list(losses.LOSS_AGG_MODES)
F64 = {"rtol": 1e-10, "atol": 1e-12}


def minpro_reference(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: tuple[float, float] = peers.MINPRO_CLIP,
    clip_ratio_c: float | None = None,
    inclusive: bool = False,
) -> torch.Tensor:
    """The per-token MinPRO losses ``[batch, time]`` by a plain loop over rows and tokens (zero
    at masked positions); differentiable in ``log_prob``. Slow: for tests. The settings are
    ``peers.minpro_loss``'s."""
    low, high = clip
    rows = []
    for b in range(log_prob.shape[0]):
        smallest = None  # minimum log-ratio over the valid tokens seen so far in this row
        row = []
        for t in range(log_prob.shape[1]):
            if not bool(response_mask[b, t]):
                row.append(log_prob.new_zeros(()))
                continue
            z = torch.clamp(
                log_prob[b, t] - old_log_prob[b, t],
                -_common.PPO_LOG_RATIO_CLAMP,
                _common.PPO_LOG_RATIO_CLAMP,
            )
            z_value = float(z.detach())
            if inclusive:
                smallest = z_value if smallest is None else min(smallest, z_value)
                weight = math.exp(smallest)
            else:
                weight = 1.0 if smallest is None else math.exp(smallest)
                smallest = z_value if smallest is None else min(smallest, z_value)
            ratio = torch.exp(z)
            adv = advantages[b, t]
            unclipped = -adv * ratio
            clipped = -adv * torch.clamp(ratio, 1.0 - low, 1.0 + high)
            term = torch.maximum(unclipped, clipped)
            if clip_ratio_c is not None and float(adv) < 0:
                term = torch.minimum(term, -adv * clip_ratio_c)
            row.append(weight * term)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def bapo_reference(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    target: float = peers.BAPO_TARGET,
    lower: tuple[float, float] = peers.BAPO_LOWER,
    upper: tuple[float, float] = peers.BAPO_UPPER,
    step: tuple[float, float] = peers.BAPO_STEP,
) -> tuple[float, float, float]:
    """BAPO's bound search step by step with plain Python sums over tokens (one host round trip
    per step, as the recipe does): ``(c_low, c_high, positive_share)``. Slow: for tests.

    The settings are ``peers.bapo_loss``'s. The bounds are compared with the ratios after rounding
    to the ratios' dtype, as ``peers.bapo_loss`` does.
    """
    lows, highs = (peers.bapo_candidates(*g) for g in peers._bapo_grid(target, lower, upper, step))
    ratio = torch.exp(_common.log_ratio(old_log_prob, log_prob)).detach()
    cast = [float(v) for v in torch.tensor(lows + highs, dtype=ratio.dtype).tolist()]
    lows, highs = cast[: len(lows)], cast[len(lows) :]
    tokens = [
        (float(ratio[b, t]), float(advantages[b, t]))
        for b in range(ratio.shape[0])
        for t in range(ratio.shape[1])
        if bool(response_mask[b, t])
    ]

    def share(c_low: float, c_high: float) -> float:
        pos = sum(r * a for r, a in tokens if a > 0 and r <= c_high)
        neg = sum(r * -a for r, a in tokens if a < 0 and r >= c_low)
        return 1.0 if neg <= 0 else pos / (pos + neg)

    i = j = 0
    current = share(lows[i], highs[j])
    while current < target and i + 1 < len(lows):
        i += 1
        current = share(lows[i], highs[j])
    while current < target and j + 1 < len(highs):
        j += 1
        current = share(lows[i], highs[j])
    return lows[i], highs[j], current


def _batch(seed, batch=8, time=48, dtype=torch.float64, spread=0.4, holes=False, adv_shift=0.0):
    """Random log-probs (some tokens near probability 1, so TV and KL differ), per-sequence
    advantages, right-padded masks (or masks with holes)."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=gen, dtype=torch.float64) * 4
    sure = torch.rand(batch, time, generator=gen) < 0.3
    old = torch.where(
        sure, -torch.rand(batch, time, generator=gen, dtype=torch.float64) * 0.05, old
    )
    logp = (old + torch.randn(batch, time, generator=gen, dtype=torch.float64) * spread).clamp(
        max=-1e-4
    )
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64) + adv_shift
    adv = adv.expand(batch, time).contiguous()
    if holes:
        mask = torch.rand(batch, time, generator=gen) < 0.7
    else:
        lengths = torch.randint(0, time + 1, (batch,), generator=gen)
        mask = torch.arange(time)[None, :] < lengths[:, None]
    weights = torch.rand(batch, time, generator=gen, dtype=torch.float64) + 0.5
    return [t.to(dtype) if t.is_floating_point() else t for t in (old, logp, adv, mask, weights)]


def _as_loss(surrogate):
    """``surrogate(log_prob)`` as a loss function with verl's keywords and no metrics."""
    return lambda old_log_prob, log_prob, advantages, response_mask: (surrogate(log_prob), {})


# --------------------------------------------------------------------------------------------
# DPPO against verl


def _verl_dppo(divergence, low, high, c, mode, old, logp, adv, mask, w):
    clip = {"clip_ratio": high, "clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio_c": c}
    cfg = verl_actor_config(loss_agg_mode=mode, **clip)
    return verl_loss_and_grad(
        f"dppo_{divergence}", old, logp, adv, mask, mode=mode, config=cfg, weights=w
    )


def _dppo_ours_and_verls(divergence, low, high, c, mode, old, logp, adv, mask, w):
    """peers.dppo_loss and verl's DPPO loss with the same divergence, clip range, dual clip,
    aggregation and rollout weights: (ours, theirs), each a (loss, gradient, metrics)."""
    theirs = _verl_dppo(divergence, low, high, c, mode, old, logp, adv, mask, w)
    ours = loss_and_grad(
        peers.dppo_loss,
        old,
        logp,
        adv,
        mask,
        divergence=divergence,
        clip=(low, high),
        clip_ratio_c=c,
        loss_agg_mode=mode,
        rollout_is_weights=w,
    )
    return ours, theirs


@requires("verl")
@pytest.mark.parametrize("divergence", ["tv", "kl"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dppo_matches_verl(divergence, mode, weighted, dtype):
    old, logp, adv, mask, w = _batch(1, dtype=dtype)
    w = w if weighted else None
    low, high = (0.1, 0.15) if divergence == "tv" else (0.03, 0.05)
    ours, theirs = _dppo_ours_and_verls(divergence, low, high, 1.3, mode, old, logp, adv, mask, w)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    torch.testing.assert_close(ours[1], theirs[1], **tol)
    # the batch exercises both the trust-region mask and the truncation
    assert 0.0 < float(ours[2]["pg_clipfrac"]) < 1.0
    assert float(ours[2]["pg_clipfrac_lower"]) > 0.0
    for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        assert float(ours[2][key]) == pytest.approx(theirs[2][f"actor/{key}"], rel=1e-6, abs=1e-7)


@requires("verl")
def test_dppo_tv_and_kl_differ_and_defaults_are_the_authors():
    old, logp, adv, mask, _ = _batch(2)
    tv = loss_and_grad(peers.dppo_loss, old, logp, adv, mask, divergence="tv")
    kl = loss_and_grad(peers.dppo_loss, old, logp, adv, mask, divergence="kl")
    assert float(tv[2]["pg_clipfrac"]) != float(kl[2]["pg_clipfrac"])
    for divergence, th in (("tv", 0.15), ("kl", 0.05)):
        theirs = _verl_dppo(divergence, th, th, 20.0, "token-mean", old, logp, adv, mask, None)
        ours = tv if divergence == "tv" else kl
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14)


@requires("verl")
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    time=st.integers(1, 16),
    divergence=st.sampled_from(["tv", "kl"]),
    mode=st.sampled_from(AGG_MODES),
    low=st.floats(0.0, 0.5),
    high=st.floats(0.0, 0.5),
    c=st.floats(1.01, 30.0),
)
def test_dppo_matches_verl_property(seed, batch, time, divergence, mode, low, high, c):
    old, logp, adv, mask, w = _batch(seed, batch=batch, time=time, spread=1.0, holes=True)
    ours, theirs = _dppo_ours_and_verls(divergence, low, high, c, mode, old, logp, adv, mask, w)
    # equal_nan: a fully masked batch gives 0 / 0 in "token-mean", in verl as here
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14, equal_nan=True)


def test_dppo_global_batch_info():
    old, logp, adv, mask, _ = _batch(3)
    plain, _ = peers.dppo_loss(old, logp, adv, mask)
    scaled, _ = peers.dppo_loss(
        old, logp, adv, mask, global_batch_info={"dp_size": 2, "batch_num_tokens": 2 * mask.sum()}
    )
    torch.testing.assert_close(scaled, plain, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# MinPRO


def test_minpro_prefix_minimum_hand_checked():
    z = torch.tensor([[0.5, -1.0, 9.0, 0.2, -3.0, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    # exclusive: empty prefix -> 0; the masked 9.0 and -3.0 are not part of any prefix
    got = peers.minpro_prefix_log_min(z, mask)
    assert got[0, [0, 1, 3, 5]].tolist() == [0.0, 0.5, -1.0, -1.0]
    got = peers.minpro_prefix_log_min(z, mask, inclusive=True)
    assert got[0, [0, 1, 3, 5]].tolist() == [0.5, -1.0, -1.0, -1.0]
    # a fully masked row and a row whose first valid token is late
    z2 = torch.tensor([[1.0, 2.0, 3.0], [4.0, -2.0, 1.0]], dtype=torch.float64)
    m2 = torch.tensor([[0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    got = peers.minpro_prefix_log_min(z2, m2)
    assert torch.isfinite(got).all()
    assert got[1, 1:].tolist() == [0.0, -2.0]


def test_minpro_hand_checked():
    # ratios 0.5, 2, 1.1 with A = +1: prefix minima 1, 0.5, 0.5; clipped ratios 0.5 (A > 0: min
    # keeps 0.5), 1.2, 1.1 -> token objectives 0.5, 1.2, 1.1
    logp = torch.log(torch.tensor([[0.5, 2.0, 1.1]], dtype=torch.float64)) - 1.0
    old = torch.full_like(logp, -1.0)
    adv = torch.ones_like(logp)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, m = peers.minpro_loss(old, logp, adv, mask, loss_agg_mode="token-sum")
    assert float(loss) == pytest.approx(-(1.0 * 0.5 + 0.5 * 1.2 + 0.5 * 1.1), rel=1e-12)
    assert float(m["minpro_prefix_min_mean"]) == pytest.approx(2.0 / 3.0, rel=1e-12)
    assert float(m["minpro_prefix_min_min"]) == pytest.approx(0.5, rel=1e-12)
    assert float(m["pg_clipfrac"]) == pytest.approx(1.0 / 3.0)
    loss, _ = peers.minpro_loss(old, logp, adv, mask, loss_agg_mode="token-sum", inclusive=True)
    assert float(loss) == pytest.approx(-(0.5 * 0.5 + 0.5 * 1.2 + 0.5 * 1.1), rel=1e-12)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    time=st.integers(1, 12),
    inclusive=st.booleans(),
    mode=st.sampled_from(AGG_MODES),
    low=st.floats(0.0, 0.9),
    high=st.floats(0.0, 2.0),
    dual=st.sampled_from([None, 1.5, 3.0]),
)
def test_minpro_matches_reference(seed, batch, time, inclusive, mode, low, high, dual):
    old, logp, adv, mask, w = _batch(seed, batch=batch, time=time, spread=0.8, holes=True)
    kw = {"clip": (low, high), "clip_ratio_c": dual, "inclusive": inclusive}
    ours = loss_and_grad(
        peers.minpro_loss, old, logp, adv, mask, loss_agg_mode=mode, rollout_is_weights=w, **kw
    )
    lp = logp.clone().requires_grad_(True)
    ref_tokens = minpro_reference(old, lp, adv, mask, **kw)
    ref = losses.agg_loss(ref_tokens * w, mask, mode)
    if ref.requires_grad:  # not when every token is masked
        ref.backward()
    ref_grad = torch.zeros_like(logp) if lp.grad is None else lp.grad
    torch.testing.assert_close(ours[0], ref.detach(), equal_nan=True, **F64)
    torch.testing.assert_close(ours[1], ref_grad, **F64)


@given(seed=st.integers(0, 2**31 - 1), time=st.integers(1, 10))
def test_minpro_holes_are_not_part_of_the_prefix(seed, time):
    """Inserting masked positions (with any values, NaN included) changes nothing."""
    old, logp, adv, _, _ = _batch(seed, batch=3, time=time, spread=0.8)
    mask = torch.ones_like(logp, dtype=torch.bool)
    dense, _ = peers.minpro_loss(old, logp, adv, mask)
    gen = torch.Generator().manual_seed(seed)
    n = 2 * time
    keep = torch.sort(torch.randperm(n, generator=gen)[:time]).values
    spread_mask = torch.zeros(3, n, dtype=torch.bool)
    spread_mask[:, keep] = True

    def spread(t, fill):
        out = torch.full((3, n), fill, dtype=t.dtype)
        out[:, keep] = t
        return out

    holey, _ = peers.minpro_loss(
        spread(old, -1.0), spread(logp, math.nan), spread(adv, 5.0), spread_mask
    )
    # the same terms summed in another order: ~n * eps * max|term| (n <= 30 terms of O(1))
    torch.testing.assert_close(holey, dense, rtol=1e-14, atol=1e-14)


def test_minpro_on_policy_and_single_tokens_are_grpo():
    """Where every prefix minimum is 1, MinPRO is PPO/GRPO's token clip (checked against verl)."""
    old, logp, adv, mask, _ = _batch(5)
    for mode in AGG_MODES:
        got, _ = peers.minpro_loss(old, old.clone(), adv, mask, loss_agg_mode=mode)
        want, _ = losses.ppo_clip_loss(old, old.clone(), adv, mask, loss_agg_mode=mode)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    col = (slice(None), slice(0, 1))
    got = loss_and_grad(peers.minpro_loss, old[col], logp[col], adv[col], mask[col])
    want = loss_and_grad(
        losses.ppo_clip_loss, old[col], logp[col], adv[col], mask[col], clip_ratio_c=1e9
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(got[1], want[1], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("inclusive", [False, True])
def test_minpro_gradcheck(inclusive):
    """The prefix minimum is stop-gradient: MinPRO's gradient is that of the surrogate whose
    minima are frozen at the current point; gradcheck that surrogate, then compare."""
    old, logp, adv, mask, w = _batch(6, batch=3, time=10, holes=True)
    kw = {"inclusive": inclusive, "clip_ratio_c": 3.0, "rollout_is_weights": w}
    with torch.no_grad():
        z0 = torch.clamp(logp - old, -20.0, 20.0)
        m0 = torch.exp(peers.minpro_prefix_log_min(z0, mask, inclusive=inclusive))

    def surrogate(lp):
        ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
        token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
        token = torch.where(adv < 0, torch.minimum(token, -adv * 3.0), token)
        return losses.agg_loss(m0 * token * w, mask, "token-mean")

    assert torch.autograd.gradcheck(surrogate, (logp.clone().requires_grad_(True),))
    ours = loss_and_grad(peers.minpro_loss, old, logp, adv, mask, **kw)
    want = loss_and_grad(_as_loss(surrogate), old, logp, adv, mask)
    torch.testing.assert_close(ours[0], want[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(ours[1], want[1], rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("divergence", ["tv", "kl"])
def test_dppo_gradcheck(divergence):
    """DPPO's truncated ratio and trust-region mask are stop-gradient: its gradient is that of
    ``agg(-A * c_t * logp * w)`` with ``c_t = min(r_t, c) * valid_t`` frozen at the current point
    (written here from the paper's binary divergences); gradcheck that surrogate, then compare."""
    old, logp, adv, mask, w = _batch(10, batch=6, time=10, holes=True, spread=1.0)
    th = 0.05
    with torch.no_grad():
        p, p_old = torch.exp(logp), torch.exp(old)
        if divergence == "tv":
            up_ok, down_ok = p - p_old <= th, p - p_old >= -th
        else:
            kl = p_old * torch.log(p_old / p) + (1 - p_old) * torch.log((1 - p_old) / (1 - p))
            up_ok, down_ok = (kl <= th) | (p <= p_old), (kl <= th) | (p >= p_old)
        valid = torch.where(adv > 0, up_ok, down_ok)
        coef = torch.exp(logp - old).clamp(max=1.3) * valid

    def surrogate(lp):
        return losses.agg_loss(-adv * coef * lp * w, mask, "token-mean")

    assert torch.autograd.gradcheck(surrogate, (logp.clone().requires_grad_(True),))
    kw = {"divergence": divergence, "clip": (th, th), "clip_ratio_c": 1.3, "rollout_is_weights": w}
    ours = loss_and_grad(peers.dppo_loss, old, logp, adv, mask, **kw)
    want = loss_and_grad(_as_loss(surrogate), old, logp, adv, mask)
    # the batch has tokens outside the trust region and truncated ratios
    assert 0.0 < float(ours[2]["pg_clipfrac"]) < 1.0
    assert float(ours[2]["pg_clipfrac_lower"]) > 0.0
    # the binary KL here has no 1e-8 guards: equal up to those
    torch.testing.assert_close(ours[1], want[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours[0], want[0], rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# BAPO


def test_bapo_candidates():
    assert peers.bapo_candidates(0.6, 0.9, 0.05) == pytest.approx(
        [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    )
    assert len(peers.bapo_candidates(1.2, 3.0, 0.05)) == 37
    assert peers.bapo_candidates(1.2, 1.3, 0.07) == pytest.approx([1.2, 1.27, 1.3])
    assert peers.bapo_candidates(0.6, 0.9, 0.0) == [0.6]
    assert peers.bapo_candidates(0.7, 0.7, 0.05) == [0.7]
    # the device-side construction gives the same values, bit for bit
    for grid in [
        (0.6, 0.9, 0.05),
        (1.2, 3.0, 0.05),
        (1.2, 1.3, 0.07),
        (0.6, 0.9, 0.0),
        (0.3, 0.99, 0.013),
    ]:
        for dtype in (torch.float64, torch.float32):
            got = peers._candidates_on(torch.device("cpu"), *grid, dtype)
            assert got.tolist() == torch.tensor(peers.bapo_candidates(*grid), dtype=dtype).tolist()


def test_bapo_hand_checked_search():
    # one positive token (A = +1) at ratio 2.0; two negative tokens (A = -1) at ratios 0.62, 1.0
    logp = torch.log(torch.tensor([[2.0, 0.62, 1.0]], dtype=torch.float64)) - 1.0
    old = torch.full_like(logp, -1.0)
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(logp, dtype=torch.bool)
    # start (0.6, 1.2): P = 0 (2.0 > 1.2 is clipped), N = 1.62 -> share 0.
    # c_low 0.65 drops the 0.62 token: N = 1; c_low tops out at 0.9: share still 0.
    # c_high must reach 2.0 to admit the positive token: share 2 / 3 >= 0.5.
    loss, m = peers.bapo_loss(old, logp, adv, mask, loss_agg_mode="token-sum")
    assert float(m["bapo_clip_low"]) == pytest.approx(0.9)
    assert float(m["bapo_clip_high"]) == pytest.approx(2.0)
    assert float(m["bapo_positive_share"]) == pytest.approx(2.0 / 3.0)
    assert float(m["bapo_positive_share_start"]) == 0.0
    # loss: -2.0 (unclipped) + max(0.62, 0.9) + 1.0
    assert float(loss) == pytest.approx(-2.0 + 0.9 + 1.0, rel=1e-12)
    assert bapo_reference(old, logp, adv, mask) == pytest.approx((0.9, 2.0, 2.0 / 3.0))
    # a target that cannot be met ends at the last pair; target 0 keeps the start
    _, m = peers.bapo_loss(old, logp, adv, mask, target=0.9)
    assert (float(m["bapo_clip_low"]), float(m["bapo_clip_high"])) == pytest.approx((0.9, 3.0))
    _, m = peers.bapo_loss(old, logp, adv, mask, target=0.0)
    assert (float(m["bapo_clip_low"]), float(m["bapo_clip_high"])) == pytest.approx((0.6, 1.2))
    # the lower bound alone can suffice: a smaller negative token set
    adv2 = torch.tensor([[0.5, -1.0, -0.1]], dtype=torch.float64)  # share 0.55 / 1.27 at start
    logp2 = torch.log(torch.tensor([[1.1, 0.62, 1.0]], dtype=torch.float64)) - 1.0
    _, m = peers.bapo_loss(old, logp2, adv2, mask)
    assert (float(m["bapo_clip_low"]), float(m["bapo_clip_high"])) == pytest.approx((0.65, 1.2))


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    time=st.integers(1, 12),
    target=st.floats(0.0, 1.0),
    adv_shift=st.floats(-1.5, 0.5),
    mode=st.sampled_from(AGG_MODES),
    dual=st.sampled_from([None, 3.0]),
    grid=st.one_of(
        st.just((peers.BAPO_LOWER, peers.BAPO_UPPER, peers.BAPO_STEP)),
        st.tuples(
            st.tuples(st.floats(0.3, 0.7), st.floats(0.7, 1.0)),
            st.tuples(st.floats(1.0, 1.5), st.floats(1.5, 4.0)),
            st.tuples(
                st.one_of(st.just(0.0), st.floats(0.005, 0.2)),
                st.one_of(st.just(0.0), st.floats(0.005, 0.5)),
            ),
        ),
    ),
)
def test_bapo_matches_reference(seed, batch, time, target, adv_shift, mode, dual, grid):
    old, logp, adv, mask, w = _batch(
        seed, batch=batch, time=time, spread=0.6, holes=True, adv_shift=adv_shift
    )
    lower, upper, step = grid
    search = {"target": target, "lower": lower, "upper": upper, "step": step}
    ours = loss_and_grad(
        peers.bapo_loss,
        old,
        logp,
        adv,
        mask,
        clip_ratio_c=dual,
        loss_agg_mode=mode,
        rollout_is_weights=w,
        **search,
    )
    c_low, c_high, share = bapo_reference(old, logp, adv, mask, **search)
    assert float(ours[2]["bapo_clip_low"]) == c_low
    assert float(ours[2]["bapo_clip_high"]) == c_high
    assert float(ours[2]["bapo_positive_share"]) == pytest.approx(share, rel=1e-10, abs=1e-12)
    # With the bounds fixed, BAPO is verl's vanilla token clip (losses.ppo_clip_loss, checked
    # against verl) with clip_ratio_low = 1 - c_low and clip_ratio_high = c_high - 1.
    want = loss_and_grad(
        losses.ppo_clip_loss,
        old,
        logp,
        adv,
        mask,
        clip_ratio_low=1.0 - c_low,
        clip_ratio_high=c_high - 1.0,
        clip_ratio_c=1e12 if dual is None else dual,
        loss_agg_mode=mode,
        rollout_is_weights=w,
    )
    torch.testing.assert_close(ours[0], want[0], equal_nan=True, **F64)
    torch.testing.assert_close(ours[1], want[1], equal_nan=True, **F64)


def test_bapo_gradcheck():
    old, logp, adv, mask, w = _batch(7, batch=3, time=10, holes=True, adv_shift=-1.0)

    def fn(lp):
        return peers.bapo_loss(old, lp, adv, mask, rollout_is_weights=w, clip_ratio_c=3.0)[0]

    _, m = peers.bapo_loss(old, logp, adv, mask)
    assert float(m["bapo_clip_low"]) > 0.6  # the search moved
    assert torch.autograd.gradcheck(fn, (logp.clone().requires_grad_(True),))


def test_bapo_float32_and_stats_dtype():
    old, logp, adv, mask, _ = _batch(8, dtype=torch.float32, adv_shift=-1.0)
    loss, m = peers.bapo_loss(old, logp, adv, mask)
    assert loss.dtype == torch.float32 and m["bapo_clip_low"].dtype == torch.float32
    want = bapo_reference(old, logp, adv, mask)
    assert (float(m["bapo_clip_low"]), float(m["bapo_clip_high"])) == want[:2]


def _bapo_rank(rank: int, world: int, init_file: str, seed: int, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        old, logp, adv, mask, _ = _batch(seed, batch=8, adv_shift=-0.8)
        part = slice(rank * 4, rank * 4 + 4)
        _, m = peers.bapo_loss(old[part], logp[part], adv[part], mask[part])
        torch.save({k: v for k, v in m.items() if k.startswith("bapo")}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_bapo_search_is_global_across_ranks(tmp_path):
    seed = 11
    old, logp, adv, mask, _ = _batch(seed, batch=8, adv_shift=-0.8)
    _, full = peers.bapo_loss(old, logp, adv, mask)
    # each half alone would choose other bounds than the whole batch
    halves = [
        peers.bapo_loss(old[s], logp[s], adv[s], mask[s])[1] for s in (slice(0, 4), slice(4, 8))
    ]
    assert any(
        float(h["bapo_clip_high"]) != float(full["bapo_clip_high"])
        or float(h["bapo_clip_low"]) != float(full["bapo_clip_low"])
        for h in halves
    )
    out = str(tmp_path / "metrics")
    torch.multiprocessing.spawn(
        _bapo_rank, args=(2, str(tmp_path / "init"), seed, out), nprocs=2, join=True
    )
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for key in ("bapo_clip_low", "bapo_clip_high"):
            assert float(got[key]) == float(full[key]), (rank, key)
        assert float(got["bapo_positive_share"]) == pytest.approx(
            float(full["bapo_positive_share"]), rel=1e-12
        )
    assert not torch.distributed.is_initialized()
    assert os.path.exists(f"{out}.1")


@pytest.mark.parametrize(
    ("fn", "kw"),
    [
        (peers.dppo_loss, {"divergence": "tv"}),
        (peers.dppo_loss, {"divergence": "kl"}),
        (peers.minpro_loss, {"inclusive": True, "clip_ratio_c": 3.0}),
        (peers.bapo_loss, {"clip_ratio_c": 3.0}),
    ],
)
def test_no_host_round_trip(fn, kw):
    """The meta device has shapes but no values: any read of a value on the host (``.item()``,
    ``bool()``, indexing with a tensor) fails there, so a loss and its backward that run on it
    never wait for the device."""
    shape = (4, 16)
    old, adv, w = (torch.empty(shape, device="meta") for _ in range(3))
    logp = torch.empty(shape, device="meta", requires_grad=True)
    mask = torch.empty(shape, dtype=torch.bool, device="meta")
    loss, metrics = fn(old, logp, adv, mask, rollout_is_weights=w, **kw)
    loss.backward()
    assert loss.shape == () and all(v.shape == () for v in metrics.values())


# --------------------------------------------------------------------------------------------
# Bad input and the table


@pytest.mark.parametrize(
    ("fn", "kw", "match"),
    [
        (peers.dppo_loss, {"divergence": "js"}, "divergence"),
        (peers.dppo_loss, {"clip": (-0.1, 0.1)}, "clip"),
        (peers.dppo_loss, {"clip": 0.1}, "clip must be a pair"),
        (peers.dppo_loss, {"clip_ratio_c": 0.0}, "clip_ratio_c"),
        (peers.dppo_loss, {"loss_agg_mode": "mean"}, "loss_agg_mode"),
        (peers.minpro_loss, {"clip": (1.0, 0.2)}, "clip"),
        (peers.minpro_loss, {"clip_ratio_c": 1.0}, "clip_ratio_c"),
        (peers.bapo_loss, {"target": 1.5}, "target"),
        (peers.bapo_loss, {"lower": (0.9, 0.6)}, "lower"),
        (peers.bapo_loss, {"upper": (0.9, 3.0)}, "upper"),
        (peers.bapo_loss, {"step": (-0.1, 0.05)}, "step"),
        (peers.bapo_loss, {"step": (0.05, 1e-300)}, "step .* is too small"),
        (peers.bapo_loss, {"clip_ratio_c": 0.5}, "clip_ratio_c"),
    ],
)
def test_bad_settings_name_the_argument(fn, kw, match):
    old, logp, adv, mask, _ = _batch(0, batch=2, time=4)
    with pytest.raises(ValueError, match=match):
        fn(old, logp, adv, mask, **kw)


# --------------------------------------------------------------------------------------------
# GPG (the control: no ratio, no clip) against verl


def _gpg_ours_and_verls(mode, old, logp, adv, mask, w, info=None):
    """baselines.gpg_loss and verl's registered "gpg" loss with the same aggregation, rollout
    weights and global batch info: (ours, theirs), each a (loss, gradient, metrics)."""
    cfg = verl_actor_config(loss_agg_mode=mode)
    cfg.global_batch_info.update(info or {})
    theirs = verl_loss_and_grad("gpg", old, logp, adv, mask, mode=mode, config=cfg, weights=w)
    ours = loss_and_grad(
        baselines.gpg_loss,
        old,
        logp,
        adv,
        mask,
        loss_agg_mode=mode,
        rollout_is_weights=w,
        global_batch_info=info,
    )
    return ours, theirs


@requires("verl")
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpg_matches_verl(mode, weighted, dtype):
    old, logp, adv, mask, w = _batch(5, dtype=dtype)
    w = w if weighted else None
    ours, theirs = _gpg_ours_and_verls(mode, old, logp, adv, mask, w)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    torch.testing.assert_close(ours[1], theirs[1], **tol)
    # the gradient is -A (times the weight) over the aggregation's normaliser on valid tokens
    assert bool((ours[1][~mask] == 0).all()) and bool((ours[1][mask] != 0).any())
    assert float(ours[2]["pg_clipfrac"]) == 0.0


@requires("verl")
@pytest.mark.parametrize("mode", AGG_MODES)
def test_gpg_matches_verl_across_ranks(mode):
    """With verl's global batch info (two data-parallel ranks, global token and sequence counts,
    a fixed length normaliser) the same normalisation as verl."""
    old, logp, adv, mask, w = _batch(6)
    info = {
        "dp_size": 2,
        "batch_num_tokens": int(mask.sum()) * 2 + 3,
        "global_batch_size": 17,
        "loss_scale_factor": 64,
    }
    ours, theirs = _gpg_ours_and_verls(mode, old, logp, adv, mask, w, info)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14)


@requires("verl")
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    time=st.integers(1, 16),
    mode=st.sampled_from(AGG_MODES),
    weighted=st.booleans(),
)
def test_gpg_matches_verl_property(seed, batch, time, mode, weighted):
    old, logp, adv, mask, w = _batch(seed, batch=batch, time=time, spread=1.0, holes=True)
    w = w if weighted else None
    ours, theirs = _gpg_ours_and_verls(mode, old, logp, adv, mask, w)
    # equal_nan: a fully masked batch gives 0 / 0 in "token-mean", in verl as here
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14, equal_nan=True)


def test_gpg_is_the_plain_policy_gradient_and_in_the_table():
    """-A * logp per token, token mean (the table's default), independent of old_log_prob; the
    gradient checked by gradcheck in float64."""
    old, logp, adv, mask, w = _batch(7)
    spec = get_loss("gpg")
    assert spec.fn is baselines.gpg_loss and spec.keywords() == {"loss_agg_mode": "token-mean"}
    loss, _ = spec(old, logp, adv, mask)
    want = sum(
        -float(adv[i, t]) * float(logp[i, t])
        for i in range(mask.shape[0])
        for t in range(mask.shape[1])
        if mask[i, t]
    ) / int(mask.sum())
    assert float(loss) == pytest.approx(want, rel=1e-10, abs=1e-12)
    other, _ = spec(old + 0.3, logp, adv, mask)
    assert float(other) == float(loss)
    small = [t[:3, :6].clone() for t in (old, logp, adv, mask, w)]
    small[3][:, 0] = True
    for mode in AGG_MODES:
        torch.autograd.gradcheck(
            lambda lp, m=mode: baselines.gpg_loss(
                small[0], lp, small[2], small[3], loss_agg_mode=m, rollout_is_weights=small[4]
            )[0],
            (small[1].requires_grad_(True),),
        )


@pytest.mark.parametrize(
    "fn", [peers.dppo_loss, peers.minpro_loss, peers.bapo_loss, baselines.gpg_loss]
)
def test_bad_tensors_name_the_argument(fn):
    old, logp, adv, mask, _ = _batch(0, batch=2, time=4)
    with pytest.raises(ValueError, match="advantages"):
        fn(old, logp, adv[:, :2], mask)
    with pytest.raises(TypeError, match="old_log_prob"):
        fn(old.numpy(), logp, adv, mask)


def test_peers_are_in_the_table():
    assert get_loss("dppo_tv").keywords()["divergence"] == "tv"
    assert get_loss("dppo_kl").keywords()["clip"] == (0.05, 0.05)
    assert get_loss("minpro").fn is peers.minpro_loss
    assert get_loss("bapo").keywords()["upper"] == (1.2, 3.0)
    old, logp, adv, mask, _ = _batch(9, adv_shift=-1.0)
    for name in ("dppo_tv", "dppo_kl", "minpro", "bapo"):
        loss, metrics = get_loss(name)(old, logp, adv, mask)
        assert torch.isfinite(loss) and "pg_clipfrac" in metrics
