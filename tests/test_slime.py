"""The slime plug-in against slime's calling convention.

slime (THUDM/slime) installs from source with Megatron-LM and is not importable here, so the
functions the plug-in calls are reproduced below from its source (THUDM/slime at 624b824,
``slime/backends/megatron_utils/loss.py`` and ``cp_utils.py``, ``slime/utils/ppo_utils.py``),
for one context-parallel rank: the response log-probs and entropy of packed ``[1, T, V]``
logits, ``get_sum_of_sample_mean`` (per-sample means, or token sums with
``calculate_per_token_loss``), ``vanilla_tis_function`` and ``compute_approx_kl``. Through them
the plug-in's loss must equal the hand computation: :mod:`kpo_rs.losses`'s loss at
``seq-mean-token-mean`` (times the number of samples: slime adds per-sample means and divides by
the step's samples later) on the responses as padded rows, plus slime's entropy and KL terms.

Tolerance: float64 throughout; both sides add the same per-token terms in other orders (per
sample, then over samples), so they differ by a few ``eps`` per token of ``sum |term|``:
``|term| <= 2 |A|`` here (log-ratios of N(0, 0.05) noise).
"""

from __future__ import annotations

import importlib
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kpo_rs.integrations import slime  # noqa: E402
from kpo_rs.losses import table as loss_table  # noqa: E402

EPS = float(np.finfo(np.float64).eps)
VOCAB = 7


# --------------------------------------------------------------------------------------------
# slime's functions, for one context-parallel rank


def get_log_probs_and_entropy(
    logits, *, args, unconcat_tokens, total_lengths, response_lengths, with_entropy=False, **_
):
    logits = logits.squeeze(0)
    if args.rollout_temperature != 1.0:
        logits = logits / args.rollout_temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    log_probs, entropy, end = [], [], 0
    for tokens, total, response in zip(unconcat_tokens, total_lengths, response_lengths):
        end += total
        start = end - response
        chunk = logp_all[start - 1 : end - 1]
        log_probs.append(chunk.gather(-1, tokens[-response:, None]).squeeze(-1))
        entropy.append(-(chunk.exp() * chunk).sum(-1))
    out = {"log_probs": log_probs}
    if with_entropy:
        out["entropy"] = entropy
    return torch.empty(0), out


def get_sum_of_sample_mean(
    total_lengths, response_lengths, loss_masks, sample_denoms=None, per_token=False
):
    if sample_denoms is None:
        sample_denoms = [m.sum() for m in loss_masks]
    if per_token:
        return lambda x: sum((xi * m).sum() for xi, m in zip(x.split(response_lengths), loss_masks))
    return lambda x: sum(
        (xi * m).sum() / torch.clamp_min(d, 1)
        for xi, m, d in zip(x.split(response_lengths), loss_masks, sample_denoms)
    )


def vanilla_tis_function(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, **_):
    tis = torch.exp(torch.cat(train_log_probs) - torch.cat(rollout_log_probs))
    weights = torch.clamp(tis, min=args.tis_clip_low, max=args.tis_clip)
    metrics = {"tis": tis.detach(), "tis_clipfrac": (weights != tis).float()}
    return pg_loss * weights, loss_masks, metrics


def compute_approx_kl(log_probs, log_probs_base, kl_loss_type, importance_ratio=None):
    log_ratio = log_probs - log_probs_base
    if kl_loss_type == "k1":
        kl = log_ratio
    else:  # "low_var_kl"
        kl = torch.clamp((-log_ratio).exp() - 1 + log_ratio, min=-10, max=10)
    return kl if importance_ratio is None else importance_ratio * kl


def load_function(path):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture
def in_slime(monkeypatch):
    helpers = SimpleNamespace(
        get_log_probs_and_entropy=get_log_probs_and_entropy,
        top_p_kwargs=lambda args, batch: {},
        vanilla_tis_function=vanilla_tis_function,
        get_sum_of_sample_mean=get_sum_of_sample_mean,
        load_function=load_function,
        compute_approx_kl=compute_approx_kl,
    )
    monkeypatch.setattr(slime, "_slime", lambda: helpers)
    for var in ("KPO_Q", "KPO_R", "KPO_P0", "KPO_MASKED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KPO_Q", "1e-2")  # an active filter


def _args(**kw):
    base = {
        "context_parallel_size": 1,
        "rollout_temperature": 1.0,
        "eps_clip": 0.2,
        "eps_clip_high": 0.28,
        "eps_clip_c": None,
        "use_rollout_logprobs": False,
        "calculate_per_token_loss": False,
        "entropy_coef": 0.0,
        "use_kl_loss": False,
        "use_tis": False,
        "get_mismatch_metrics": False,
        "use_opsm": False,
        "custom_tis_function_path": None,
        "custom_pg_loss_reducer_function_path": None,
    }
    return Namespace(**(base | kw))


def _micro_batch(seed: int, n: int = 5):
    """A packed micro batch of ``n`` samples (prompt + response) as slime hands it over, and the
    logits of the policy: ``(batch, logits)``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, 6, (n,), generator=gen).tolist()
    responses = torch.randint(1, 30, (n,), generator=gen).tolist()
    totals = [p + r for p, r in zip(prompts, responses)]
    tokens = [torch.randint(0, VOCAB, (t,), generator=gen) for t in totals]
    logits = torch.randn(1, sum(totals), VOCAB, generator=gen, dtype=torch.float64)
    _, out = get_log_probs_and_entropy(
        logits, args=_args(), unconcat_tokens=tokens, total_lengths=totals,
        response_lengths=responses,
    )  # fmt: skip
    old = [
        lp + 0.05 * torch.randn(lp.shape, generator=gen, dtype=lp.dtype) for lp in out["log_probs"]
    ]
    masks = [(torch.rand(r, generator=gen) < 0.85).to(torch.float64) for r in responses]
    batch = {
        "unconcat_tokens": tokens,
        "total_lengths": totals,
        "response_lengths": responses,
        "loss_masks": masks,
        "advantages": [torch.full((r,), float(torch.randn(1, generator=gen))) for r in responses],
        "log_probs": old,
        "rollout_log_probs": [o + 0.05 * torch.randn(o.shape, generator=gen) for o in old],
        "ref_log_probs": [o - 0.1 for o in old],
        "rollout_mask_sums": None,
    }
    return batch, logits


def _slime_reducer(batch, args):
    return get_sum_of_sample_mean(
        batch["total_lengths"], batch["response_lengths"], batch["loss_masks"],
        batch["rollout_mask_sums"], args.calculate_per_token_loss,
    )  # fmt: skip


def _padded(rows, fill=0.0):
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def _by_hand(name, batch, logits, args, weights=None, agg="seq-mean-token-mean"):
    """The loss table's loss on the padded responses (times the samples under slime's
    per-sample means), with slime's entropy and KL terms."""
    _, out = get_log_probs_and_entropy(
        logits, args=args, unconcat_tokens=batch["unconcat_tokens"],
        total_lengths=batch["total_lengths"], response_lengths=batch["response_lengths"],
        with_entropy=True,
    )  # fmt: skip
    old = batch["rollout_log_probs"] if args.use_rollout_logprobs else batch["log_probs"]
    mask = _padded([m.bool() for m in batch["loss_masks"]], False)
    kw = {"clip": (args.eps_clip, args.eps_clip_high)} if name == "kpo_clipped" else {}
    loss, _ = loss_table.get_loss(name)(
        _padded(old), _padded(out["log_probs"]), _padded(batch["advantages"]), mask,
        loss_agg_mode=agg, rollout_is_weights=None if weights is None else _padded(weights),
        q=1e-2, **kw,
    )  # fmt: skip
    n = len(batch["loss_masks"])
    loss = loss * (1 if agg == "token-sum" else n)
    reduce = _slime_reducer(batch, args)
    loss = loss - args.entropy_coef * reduce(torch.cat(out["entropy"]))
    if args.use_kl_loss:
        kl = compute_approx_kl(
            torch.cat(out["log_probs"]), torch.cat(batch["ref_log_probs"]), args.kl_loss_type
        )
        loss = loss + args.kl_loss_coef * reduce(kl)
    return loss


def _compare(name, batch, logits, args, **hand):
    a = logits.clone().requires_grad_(True)
    got, metrics = getattr(slime, f"{name}_loss")(args, batch, a, _slime_reducer(batch, args))
    got.backward()
    b = logits.clone().requires_grad_(True)
    want = _by_hand(name, batch, b, args, **hand)
    want.backward()
    terms = sum(
        float((2 * adv.abs() * m).sum()) for adv, m in zip(batch["advantages"], batch["loss_masks"])
    )
    tol = 8 * logits.shape[1] * EPS * max(terms, 1.0)
    assert abs(float(got.detach()) - float(want.detach())) <= tol
    # gradients through log_softmax: the same operations per token, sums in another order
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    assert all(v.dim() == 0 for v in metrics.values())  # slime stacks scalars for logging
    return metrics


@pytest.mark.parametrize("name", slime.LOSS_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_loss_table_through_slimes_reducer(in_slime, name, seed):
    batch, logits = _micro_batch(seed)
    metrics = _compare(name, batch, logits, _args(eps_clip=0.02, eps_clip_high=0.03))
    assert {"loss", "pg_loss", "entropy_loss", "ppo_kl", "pg_clipfrac"} <= set(metrics)


def test_rollout_logprobs_entropy_kl_and_per_token_loss(in_slime):
    batch, logits = _micro_batch(2)
    args = _args(
        use_rollout_logprobs=True, entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1,
        kl_loss_type="low_var_kl", rollout_temperature=0.7,
    )  # fmt: skip
    _compare("kpo_clipped", batch, logits, args)
    per_token = _args(calculate_per_token_loss=True)
    _compare("kpo", batch, logits, per_token, agg="token-sum")


def test_tis_weights_multiply_the_per_token_losses(in_slime):
    batch, logits = _micro_batch(3)
    args = _args(use_tis=True, tis_clip_low=0.5, tis_clip=1.02)
    tis = [
        torch.clamp(torch.exp(o - r), 0.5, 1.02)
        for o, r in zip(batch["log_probs"], batch["rollout_log_probs"])
    ]
    metrics = _compare("kpo_clipped", batch, logits, args, weights=tis)
    assert {"tis", "tis_clipfrac"} <= set(metrics)


def test_context_parallel_and_opsm_are_refused_with_the_fix(in_slime):
    batch, logits = _micro_batch(4)
    for args, words in (
        (_args(context_parallel_size=2), "--context-parallel-size 2: slime splits each response"),
        (_args(use_opsm=True), "--use-opsm:"),
    ):
        with pytest.raises(ValueError) as info:
            slime.kpo_clipped_loss(args, batch, logits, _slime_reducer(batch, args))
        assert str(info.value).startswith(words) and "\n" not in str(info.value)
    assert "set --context-parallel-size 1" in _message(slime.check_context_parallel, 4)
    slime.check_context_parallel(_args())  # one rank: nothing to refuse
    with pytest.raises(ValueError, match="name must be one of"):
        slime.loss_fn("grpo")


def _message(fn, size):
    with pytest.raises(ValueError) as info:
        fn(_args(context_parallel_size=size))
    return str(info.value)


def test_a_bad_kpo_variable_is_named(in_slime, monkeypatch):
    batch, logits = _micro_batch(5)
    monkeypatch.setenv("KPO_R", "0")
    args = _args()
    with pytest.raises(ValueError, match=r"^KPO_R=0: r must be"):
        slime.kpo_loss(args, batch, logits, _slime_reducer(batch, args))


def test_outside_slime_the_loss_says_it_runs_inside_slime():
    batch, logits = _micro_batch(6)
    args = _args()
    try:
        importlib.import_module("slime.backends.megatron_utils.loss")
    except ImportError:
        with pytest.raises(ImportError, match=r"runs inside slime \(github.com/THUDM/slime\)"):
            slime.kpo_loss(args, batch, logits, _slime_reducer(batch, args))
    else:  # pragma: no cover - only where slime is installed
        pytest.skip("slime is installed")


def test_the_start_up_line_and_an_idle_clip_warning(in_slime, monkeypatch, capsys):
    monkeypatch.setattr(slime, "_last_logged", [])
    monkeypatch.setattr(slime, "_warned_once", set())
    monkeypatch.setenv("KPO_Q", "1e-6")  # the authors' filter: ratios stay near 1
    batch, logits = _micro_batch(0)
    batch["rollout_log_probs"] = batch["log_probs"]
    args = _args(eps_clip=0.2, eps_clip_high=0.28)
    with pytest.warns(UserWarning, match=r"\(0.2, 0.28\) cannot bite.*--eps-clip 3e-4"):
        slime.kpo_clipped_loss(args, batch, logits, _slime_reducer(batch, args))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        slime.kpo_clipped_loss(args, batch, logits, _slime_reducer(batch, args))
    err = capsys.readouterr().err
    assert err.count("slime loss kpo_clipped: clip (0.2, 0.28)") == 1, err
    assert "q=1e-06" in err and "(from KPO_Q)" in err
