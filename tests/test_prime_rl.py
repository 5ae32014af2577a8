"""The prime-rl plug-in against prime-rl's calling convention.

prime-rl (Python 3.12 only, not on PyPI) cannot be installed here, so its convention is
reproduced below from its source (PrimeIntellect-ai/prime-rl at 559b447,
``src/prime_rl/trainer/rl/loss.py``): ``LossInputs`` of one sample (1-D tensors),
``setup_rl_loss_fn`` importing ``import_path`` and calling ``fn(inputs, **kwargs)``, and
``compute_loss`` adding the per-sample losses of a packed micro batch split by
``sequence_lengths`` (the rl mask being ``loss_mask & (rl_weights != 0)`` when a weight stream is
given) and dividing by the global rl token count. Through that path the plug-in's loss must equal
:mod:`kpo_rs.losses`'s with ``loss_agg_mode="token-mean"`` on the same samples as padded
rows (prompt tokens masked), with the weight stream as ``rollout_is_weights``.

Tolerance: float64; the two sides add the same per-token losses in a different order (per
sample, then over samples, against one masked sum), so they differ by at most about
``n eps sum|loss_t|`` over ``n`` tokens, divided by the token count; ``|loss_t| <= 2 |A_t|`` here
(filtered log-ratios of N(0, 0.1) noise stay far below log 2).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kpo_rs.integrations import prime_rl  # noqa: E402
from kpo_rs.losses import table as loss_table  # noqa: E402

EPS = float(np.finfo(np.float64).eps)


@dataclass
class LossInputs:  # prime-rl's fields, in its order
    trainer_logprobs: torch.Tensor
    inference_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    loss_weights: torch.Tensor | None = None


def setup_rl_loss_fn(import_path: str, kwargs: dict):
    module_path, _, name = import_path.rpartition(".")
    custom_fn = getattr(importlib.import_module(module_path), name)
    return lambda inputs: custom_fn(inputs, **kwargs)


def compute_loss(trainer, inference, advantages, loss_mask, rl_weights, rl_fn, rl_scale):
    """prime-rl's rl component over lists of per-sample tensors: ``(loss, metrics)``."""
    metrics: dict[str, list] = {}
    rl_loss = trainer[0].sum() * 0.0
    weights = rl_weights if rl_weights is not None else [None] * len(trainer)
    for t, i, a, m, w in zip(trainer, inference, advantages, loss_mask, weights):
        if w is not None:
            m = m & (w != 0)
            if not bool(m.any()):
                continue
        result = rl_fn(LossInputs(t, i, None, a, m, w))
        for k, v in result.metrics.items():
            metrics.setdefault(k, []).append(v)
        rl_loss = rl_loss + result.loss
    stacked = {k: torch.stack(v) if v[0].dim() == 0 else torch.cat(v) for k, v in metrics.items()}
    return rl_loss / rl_scale, stacked


def _samples(seed: int, n: int = 6, weights: bool = False):
    """Samples of prompt (masked) + response (holes: multi-turn tool output), as prime-rl packs
    them, and the same as padded rows."""
    rng = np.random.default_rng(seed)
    prompts, responses = rng.integers(1, 12, n), rng.integers(0, 40, n)
    lengths = prompts + responses
    old = [-rng.random(k) * 2 for k in lengths]
    new = [o + rng.normal(0, 0.1, o.size) for o in old]
    adv = [np.full(k, rng.normal()) for k in lengths]
    mask = []
    for p, k in zip(prompts, lengths):
        m = np.arange(k) >= p
        m[rng.random(k) < 0.15] = False
        mask.append(m)
    w = [rng.choice([0.0, 0.5, 1.0, 2.0], k) for k in lengths] if weights else None

    def padded(rows, fill):
        out = np.full((n, lengths.max()), fill, dtype=np.result_type(rows[0], fill))
        for i, row in enumerate(rows):
            out[i, : row.size] = row
        return torch.from_numpy(out)

    t = lambda rows: [torch.from_numpy(r) for r in rows]  # noqa: E731
    packed = (t(new), t(old), t(adv), t(mask), None if w is None else t(w))
    pad = (padded(old, 0.0), padded(new, 0.0), padded(adv, 0.0), padded(mask, False))
    return packed, pad, (None if w is None else padded(w, 0.0))


def _via_prime_rl(name, packed, kwargs):
    new, old, adv, mask, w = packed
    new = [x.clone().requires_grad_(True) for x in new]
    rl_mask = mask if w is None else [m & (x != 0) for m, x in zip(mask, w)]
    scale = max(int(sum(int(m.sum()) for m in rl_mask)), 1)
    fn = setup_rl_loss_fn(f"kpo_rs.integrations.prime_rl.{name}_loss", kwargs)
    loss, metrics = compute_loss(new, old, adv, mask, w, fn, scale)
    loss.backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in new]  # a skipped sample
    return loss.detach(), grads, metrics


def _tolerance(adv, mask):
    n = int(mask.sum())
    return 4 * n * EPS * float((2 * adv.abs() * mask).sum()) / max(n, 1)


@pytest.mark.parametrize("name", prime_rl.LOSS_NAMES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_loss_table_at_prime_rls_global_token_mean(name, weights, seed):
    packed, (old, new, adv, mask), w = _samples(seed, weights=weights)
    kwargs = {"q": 1e-2} if name.startswith("kpo") else {}
    got, grads, metrics = _via_prime_rl(name, packed, kwargs)
    rl_mask = mask if w is None else mask & (w != 0)
    lp = new.clone().requires_grad_(True)
    want, _ = loss_table.get_loss(name)(
        old, lp, adv, rl_mask, loss_agg_mode="token-mean", rollout_is_weights=w, **kwargs
    )
    want.backward()
    want = want.detach()
    tol = _tolerance(adv, rl_mask)
    assert abs(float(got) - float(want)) <= tol, (float(got), float(want), tol)
    for i, g in enumerate(grads):  # per token the same operations: only the sum's order differs
        torch.testing.assert_close(g, lp.grad[i, : g.numel()], rtol=0, atol=1e-15)
    assert metrics and all(v.dim() == 1 for v in metrics.values())  # prime-rl stacks 0-d ones
    if name == "kpo_clipped":
        assert "pg_clipfrac" in metrics


def test_zero_mode_counts_positions_from_the_response_start_as_the_authors():
    packed, _, _ = _samples(3)
    new, old, adv, mask, _ = packed
    kwargs = {"q": 1e-2, "masked": "zero", "clip": [0.2, 0.2]}  # a TOML list
    got, _, _ = _via_prime_rl("kpo_clipped", packed, kwargs)
    # the authors' layout: responses only, from their first loss token, right-padded
    starts = [int(torch.nonzero(m)[0, 0]) if m.any() else m.numel() for m in mask]
    rows = [(n[s:], o[s:], a[s:], m[s:]) for n, o, a, m, s in zip(new, old, adv, mask, starts)]
    width = max(r[0].numel() for r in rows)

    def pad(k, fill):
        out = torch.full((len(rows), width), fill, dtype=rows[0][k].dtype)
        for i, r in enumerate(rows):
            out[i, : r[k].numel()] = r[k]
        return out

    m = pad(3, False)
    want, _ = loss_table.get_loss("kpo_clipped")(
        pad(1, 0.0), pad(0, 0.0), pad(2, 0.0), m, q=1e-2, masked="zero", clip=(0.2, 0.2),
        loss_agg_mode="token-mean",
    )  # fmt: skip
    assert abs(float(got) - float(want)) <= _tolerance(pad(2, 0.0), m)
    # without the cut, the prompt's positions would have been counted as steps
    uncut, _ = loss_table.get_loss("kpo_clipped")(
        *[torch.nn.utils.rnn.pad_sequence(x, batch_first=True) for x in (old, new, adv, mask)],
        q=1e-2, masked="zero", clip=(0.2, 0.2), loss_agg_mode="token-mean",
    )  # fmt: skip
    assert abs(float(uncut) - float(want)) > 1e3 * _tolerance(pad(2, 0.0), m)


def test_an_empty_sample_gives_zero_with_a_graph():
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    out = prime_rl.kpo_clipped_loss(LossInputs(x, x.detach(), None, torch.ones(5), x < -1))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros(5, dtype=torch.float64))
    assert isinstance(out, prime_rl.LossOutputs)


def test_bad_kwargs_and_inputs_are_refused_in_one_line():
    x = torch.zeros(4, dtype=torch.float64)
    ok = LossInputs(x, x, None, x, x == 0)
    cases = [
        (lambda: prime_rl.kpo_loss(ok, loss_agg_mode="token-mean"), ValueError, "loss_agg_mode:"),
        (lambda: prime_rl.kpo_loss(ok, kalman_q=1.0), ValueError, "'kalman_q'"),
        (lambda: prime_rl.kpo_loss(ok, q=-1.0), ValueError, "q must be"),
        (
            lambda: prime_rl.kpo_loss(LossInputs(x[None], x, None, x, x == 0)),
            ValueError,
            "inputs.trainer_logprobs must be 1-D",
        ),
        (
            lambda: prime_rl.kpo_loss(LossInputs(x, None, None, x, x == 0)),
            TypeError,
            "inputs.inference_logprobs must be a torch.Tensor",
        ),
        (lambda: prime_rl.loss_fn("bapo"), ValueError, "name must be one of"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc) as info:
            call()
        assert words in str(info.value) and "\n" not in str(info.value)


def test_the_start_up_line_and_an_idle_clip_warning(monkeypatch, capsys):
    import warnings

    monkeypatch.setattr(prime_rl, "_last_logged", [])
    monkeypatch.setattr(prime_rl, "_warned_once", set())
    g = torch.Generator().manual_seed(0)
    new = torch.randn(64, generator=g, dtype=torch.float64) * 1e-3
    inputs = LossInputs(new, torch.zeros(64, dtype=torch.float64), None, torch.ones(64), new > -9)
    # A PPO-scale clip on near-1 filtered ratios warns once per process.
    with pytest.warns(UserWarning, match=r"clip range \(0.2, 0.2\) cannot bite.*clip = \[3e-4"):
        prime_rl.kpo_clipped_loss(inputs, clip=[0.2, 0.2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prime_rl.kpo_clipped_loss(inputs, clip=[0.2, 0.2])  # not again
    line = capsys.readouterr().err
    assert line.count("\n") == 1, line  # the line once per process while nothing changes
    assert "prime-rl loss kpo_clipped: clip (0.2, 0.2), loss_agg_mode token-sum" in line
    assert "q=1e-06, r=1.0, p0=0.0 (from kwargs clip)" in line
    monkeypatch.setattr(prime_rl, "_warned_once", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prime_rl.kpo_clipped_loss(inputs)  # the authors' 3e-4 / 4e-4: not judged
    assert "clip (0.0003, 0.0004)" in capsys.readouterr().err  # a change prints the line again
