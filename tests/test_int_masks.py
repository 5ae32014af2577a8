"""Integer 0/1 masks (verl's ``response_mask``) are read as bool masks everywhere the losses
accept them: the numpy API, the torch op (every backend) and ``kpo filter``'s mask column; the
results equal the bool mask's bit for bit (the mask is converted before any arithmetic, so there
is no tolerance to derive). Any other value is refused with one line naming ``mask`` and where."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kpo_rs
from kpo_rs import testing

INTS = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64]
MASKED = ("holes", "right_padded", "sparse", "rows_masked", "all")


def _same(got, want) -> None:
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(  # bitwise, NaN and signed zeros too
            np.ascontiguousarray(g).view(np.uint8), np.ascontiguousarray(w).view(np.uint8)
        )


@settings(deadline=None)
@given(
    testing.padded_batches(mask_patterns=MASKED, long_time=0),
    testing.filter_params(),
    st.sampled_from(INTS),
)
def test_padded_int_masks_equal_bool_masks(batch, params, int_type):
    ints = batch.mask.astype(int_type)
    grad = np.cos(np.arange(batch.values.size)).reshape(batch.values.shape)
    grad = grad.astype(batch.dtype)  # read at every position under "hold"
    for fn, x in (
        (kpo_rs.kalman_filter, batch.values),
        (kpo_rs.kalman_filter_adjoint, grad),
        (kpo_rs.log_likelihood, batch.values),
    ):
        _same(fn(x, ints, **params), fn(x, batch.mask, **params))
    if batch.values.shape[0]:  # a list of Python ints is an int64 array ([] has no shape)
        _same(
            kpo_rs.kalman_filter(batch.values, ints.tolist(), **params),
            kpo_rs.kalman_filter(batch.values, batch.mask, **params),
        )


@settings(deadline=None)
@given(
    testing.packed_batches(mask_patterns=MASKED, long_time=0),
    testing.filter_params(),
    st.sampled_from(INTS),
)
def test_packed_int_masks_equal_bool_masks(batch, params, int_type):
    ints = batch.mask.astype(int_type)
    cu = batch.cu_seqlens
    grad = np.cos(np.arange(batch.values.size)).astype(batch.dtype)  # read at every position
    for fn, x in (
        (kpo_rs.kalman_filter_packed, batch.values),
        (kpo_rs.kalman_filter_packed_adjoint, grad),
        (kpo_rs.log_likelihood_packed, batch.values),
    ):
        _same(fn(x, cu, ints, **params), fn(x, cu, batch.mask, **params))
    _same(
        kpo_rs.innovation_sums(batch.values, ints, cu_seqlens=cu, **params),
        kpo_rs.innovation_sums(batch.values, batch.mask, cu_seqlens=cu, **params),
    )


@pytest.mark.parametrize(
    ("call", "where"),
    [
        (lambda m: kpo_rs.kalman_filter(np.zeros((3, 4)), m.reshape(3, 4)), "row 1, position 2"),
        (
            lambda m: kpo_rs.kalman_filter_adjoint(np.zeros((3, 4)), m.reshape(3, 4)),
            "row 1, position 2",
        ),
        (
            lambda m: kpo_rs.kalman_filter_packed(np.zeros(12), np.array([0, 5, 12]), m),
            "position 6",
        ),
        (lambda m: kpo_rs.log_likelihood(np.zeros((3, 4)), m.reshape(3, 4)), "row 1, position 2"),
    ],
)
@pytest.mark.parametrize("bad", [2, -1])
def test_other_integers_are_refused_naming_mask_value_and_position(call, where, bad):
    mask = np.ones(12, dtype=np.int64)
    mask[6], mask[9] = bad, 5
    with pytest.raises(ValueError) as info:
        call(mask)
    message = str(info.value)
    assert message.startswith(f"mask: value {bad} at {where} is not 0 or 1")
    assert "\n" not in message


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, object])
def test_masks_of_other_dtypes_are_refused_naming_mask(dtype):
    with pytest.raises(TypeError, match=r"^mask must have dtype bool \(or an integer dtype"):
        kpo_rs.kalman_filter(np.zeros((2, 3)), np.ones((2, 3), dtype=dtype))


# --------------------------------------------------------------------------------------------
# the torch op


torch = pytest.importorskip("torch")
from kpo_rs import torch_ops  # noqa: E402

TORCH_INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
CPU_BACKENDS = ["rust", "scan", "scan_doubling", "reference"]


@settings(deadline=None)
@given(
    testing.padded_batches(mask_patterns=MASKED, long_time=0, max_time=40),
    testing.filter_params(),
    st.sampled_from(TORCH_INTS),
    st.sampled_from(CPU_BACKENDS),
)
def test_torch_int_masks_equal_bool_masks_forward_and_backward(batch, params, int_type, backend):
    m0 = params.pop("m0")
    z = torch.from_numpy(batch.values)
    mask = torch.from_numpy(batch.mask)
    results = []
    for m in (mask, mask.to(int_type)):
        zz = z.clone().requires_grad_(True)
        y = torch_ops.kalman_filter(zz, m, m0=m0, backend=backend, **params)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        results.append((y.detach(), zz.grad))
    for got, want in zip(results[1], results[0]):
        _same(got.numpy(), want.numpy())


@settings(deadline=None)
@given(
    testing.packed_batches(mask_patterns=MASKED, long_time=0, max_time=40),
    st.sampled_from(TORCH_INTS),
)
def test_torch_packed_int_masks_equal_bool_masks(batch, int_type):
    z, cu = torch.from_numpy(batch.values), torch.from_numpy(batch.cu_seqlens)
    mask = torch.from_numpy(batch.mask)
    want = torch_ops.kalman_filter_packed(z, cu, mask)
    got = torch_ops.kalman_filter_packed(z, cu, mask.to(int_type))
    _same(got.numpy(), want.numpy())


def test_torch_other_integers_are_refused_naming_mask_value_and_position():
    mask = torch.ones(3, 4, dtype=torch.int64)
    mask[1, 2], mask[2, 0] = 2, 7
    with pytest.raises(ValueError, match=r"^mask: value 2 at row 1, position 2 is not 0 or 1"):
        torch_ops.kalman_filter(torch.zeros(3, 4), mask)
    flat = torch.tensor([1, 1, 0, -1, 1], dtype=torch.int32)
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"^mask: value -1 at position 3 is not 0 or 1"):
        torch_ops.kalman_filter_packed(torch.zeros(5), cu, flat)
    with pytest.raises(TypeError, match=r"^mask must have dtype torch.bool \(or an integer"):
        torch_ops.kalman_filter(torch.zeros(3, 4), torch.ones(3, 4))


def test_torch_int_mask_under_compile_is_refused_with_the_fix():
    compiled = torch.compile(torch_ops.kalman_filter, fullgraph=True, backend="eager")
    z, mask = torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.int64)
    with pytest.raises(Exception, match=r"mask must have dtype torch.bool under torch.compile"):
        compiled(z, mask)
    torch.testing.assert_close(compiled(z, mask.bool()), torch_ops.kalman_filter(z, mask))
