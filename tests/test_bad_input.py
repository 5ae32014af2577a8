"""Bad input raises ValueError or TypeError naming the argument; odd but valid layouts are read
correctly; inputs are never modified."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import kpo_rs

Z = np.arange(12, dtype=np.float64).reshape(3, 4) / 10
CU = np.array([0, 5, 5, 12], dtype=np.int64)
FLAT = np.arange(12, dtype=np.float32) / 10


def fwd(values=Z, mask=None, **kw):
    return kpo_rs.kalman_filter(values, mask, **kw)


def adj(grad=Z, mask=None, **kw):
    return kpo_rs.kalman_filter_adjoint(grad, mask, **kw)


def pfwd(values=FLAT, cu=CU, mask=None, **kw):
    return kpo_rs.kalman_filter_packed(values, cu, mask, **kw)


def padj(grad=FLAT, cu=CU, mask=None, **kw):
    return kpo_rs.kalman_filter_packed_adjoint(grad, cu, mask, **kw)


def raises(exc, *words):
    """pytest.raises whose message must contain every word (the argument's name first)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: fwd(np.zeros(4)), "values"),
        (lambda: fwd(np.zeros((2, 3, 4))), "values"),
        (lambda: fwd(np.float64(1.0)), "values"),
        (lambda: adj(np.zeros(4)), "grad"),
        (lambda: pfwd(np.zeros((2, 6))), "values"),
        (lambda: padj(np.zeros((12, 1))), "grad"),
        (lambda: pfwd(cu=np.zeros((2, 2), dtype=np.int64)), "cu_seqlens"),
        (lambda: fwd(mask=np.ones(12, dtype=bool)), "mask"),
    ],
)
def test_wrong_number_of_dimensions(call, arg):
    with raises(ValueError, arg, "-D"):
        call()


@pytest.mark.parametrize("shape", [(3, 5), (4, 4), (1, 4)])
def test_mask_shape_differs(shape):
    with raises(ValueError, "mask", "shape"):
        fwd(mask=np.ones(shape, dtype=bool))
    with raises(ValueError, "mask", "shape"):
        adj(mask=np.ones(shape, dtype=bool))


def test_packed_mask_length_differs():
    with raises(ValueError, "mask"):
        pfwd(mask=np.ones(11, dtype=bool))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, object])
def test_non_bool_mask(dtype):  # integer 0/1 masks are accepted: tests/test_int_masks.py
    with raises(TypeError, "mask", "bool"):
        fwd(mask=np.ones(Z.shape, dtype=dtype))
    with raises(TypeError, "mask", "bool"):
        padj(mask=np.ones(12, dtype=dtype))


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.uint16, bool, np.complex64, np.complex128, object]
)
def test_integer_complex_or_object_values(dtype):
    with raises(TypeError, "values", "dtype"):
        fwd(Z.astype(dtype))
    with raises(TypeError, "grad", "dtype"):
        adj(Z.astype(dtype))
    with raises(TypeError, "values", "dtype"):
        pfwd(FLAT.astype(dtype))


@pytest.mark.parametrize("obj", [{"a": 1}, "text", None, 3.0])
def test_not_an_array(obj):
    with raises(TypeError, "values"):
        fwd(obj)
    with raises(TypeError, "cu_seqlens"):
        pfwd(cu=obj)


def _layouts(base):
    """The same logical 2-D array in several memory layouts."""
    wide = np.zeros((base.shape[0], 2 * base.shape[1]), dtype=base.dtype)
    wide[:, ::2] = base
    rev = np.ascontiguousarray(base[::-1, ::-1])[::-1, ::-1]
    return {
        "fortran": np.asfortranarray(base),
        "strided": wide[:, ::2],
        "negative": rev,
        "transposed": np.ascontiguousarray(base.T).T,
        "readonly": _readonly(base.copy()),
    }


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("layout", ["fortran", "strided", "negative", "transposed", "readonly"])
def test_non_contiguous_inputs_are_read_correctly(layout):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 9))
    mask = rng.random((4, 9)) < 0.6
    want = kpo_rs.kalman_filter(z, mask, q=1e-2, p0=math.inf)
    want_dz, want_dm0 = kpo_rs.kalman_filter_adjoint(z, mask, q=1e-2)
    zl, ml = _layouts(z)[layout], _layouts(mask)[layout]
    np.testing.assert_array_equal(zl, z)
    np.testing.assert_array_equal(kpo_rs.kalman_filter(zl, ml, q=1e-2, p0=math.inf), want)
    dz, dm0 = kpo_rs.kalman_filter_adjoint(zl, ml, q=1e-2)
    np.testing.assert_array_equal(dz, want_dz)
    np.testing.assert_array_equal(dm0, want_dm0)


def test_non_contiguous_packed_inputs_are_read_correctly():
    rng = np.random.default_rng(1)
    values = rng.normal(size=12)
    mask = rng.random(12) < 0.7
    want = pfwd(values, CU, mask)
    wide_v, wide_m, wide_cu = np.zeros(24), np.zeros(24, bool), np.zeros(8, np.int64)
    wide_v[::2], wide_m[::2], wide_cu[::2] = values, mask, CU
    np.testing.assert_array_equal(pfwd(wide_v[::2], wide_cu[::2], wide_m[::2]), want)
    np.testing.assert_array_equal(
        pfwd(values[::-1].copy()[::-1], CU[::-1].copy()[::-1], mask), want
    )


def test_non_native_byte_order_is_read_correctly():
    z = np.random.default_rng(2).normal(size=(2, 5))
    np.testing.assert_array_equal(fwd(z.astype(">f8")), fwd(z))


@pytest.mark.parametrize(
    ("cu", "words"),
    [
        ([1, 5, 12], ("start at 0",)),
        ([0, 6, 5, 12], ("non-decreasing",)),
        ([0, 5, 13], ("past the end",)),
        ([0, 5, 11], ("end at",)),
        ([0, -1, 12], ("negative",)),
        ([], ("none",)),
    ],
)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_bad_offsets(cu, words, dtype):
    cu = np.array(cu, dtype=dtype)
    with raises(ValueError, "cu_seqlens", *words):
        pfwd(cu=cu)
    with raises(ValueError, "cu_seqlens", *words):
        padj(cu=cu)


@pytest.mark.parametrize("dtype", [np.float64, np.uint32, np.int16, np.uint64, bool])
def test_offsets_of_wrong_dtype(dtype):
    with raises(TypeError, "cu_seqlens", "int32 or int64"):
        pfwd(cu=CU.astype(dtype))


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"q": -1e-6}, "q"),
        ({"q": math.nan}, "q"),
        ({"r": 0.0}, "r"),
        ({"r": -1.0}, "r"),
        ({"r": math.nan}, "r"),
        ({"r": math.inf}, "r"),
        ({"p0": -0.1}, "p0"),
        ({"p0": math.nan}, "p0"),
        ({"m0": math.nan}, "m0"),
        ({"m0": math.inf}, "m0"),
    ],
)
def test_bad_parameters(kw, name):
    with raises(ValueError, name):
        fwd(**kw)
    with raises(ValueError, name):
        pfwd(**kw)
    with raises(ValueError, name):  # the adjoint takes the same settings, m0 included
        adj(**kw)
    if "m0" not in kw:  # the gains depend on the variances only
        with raises(ValueError, name):
            kpo_rs.gains(3, **kw)


def test_m0_overflowing_float32_is_rejected():
    with raises(ValueError, "m0"):
        fwd(Z.astype(np.float32), m0=1e39)


@pytest.mark.parametrize(
    ("kw", "name"), [({"q": "1e-6"}, "q"), ({"m0": "0"}, "m0"), ({"r": 1j}, "r")]
)
def test_parameters_of_wrong_type(kw, name):
    with raises(TypeError, name):
        fwd(**kw)


def test_bad_masked_mode():
    with raises(ValueError, "masked", "hold"):
        fwd(masked="skip")
    with raises(ValueError, "masked"):
        padj(masked="Hold")


def test_bad_gains_count():
    with raises(ValueError, "n"):
        kpo_rs.gains(-1)
    with raises(TypeError, "n"):
        kpo_rs.gains(2.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_at_a_valid_position(bad, dtype):
    z = Z.astype(dtype)
    z[2, 1] = bad
    with raises(ValueError, "values", "row 2", "position 1"):
        fwd(z)
    with raises(ValueError, "grad", "row 2", "position 1"):
        adj(z)
    flat = FLAT.astype(dtype)
    flat[7] = bad  # row 2 of CU starts at 5
    with raises(ValueError, "values", "row 2", "position 2"):
        pfwd(flat)
    with raises(ValueError, "grad", "row 2", "position 2"):
        padj(flat)


def test_the_lowest_failing_row_is_named():
    z = np.zeros((64, 8))
    z[40, 3] = np.nan
    z[9, 7] = np.inf
    z[63, 0] = np.nan
    with raises(ValueError, "row 9", "position 7"):
        fwd(z)


@pytest.mark.parametrize("masked", ["hold", "zero"])
def test_nan_at_a_masked_position_is_fine(masked):
    z = Z.copy()
    z[1, 2] = np.nan
    mask = np.ones(Z.shape, dtype=bool)
    mask[1, 2] = False
    out = fwd(z, mask, masked=masked)
    assert np.all(np.isfinite(out))
    flat = FLAT.copy()
    flat[3] = np.inf
    fmask = np.ones(12, dtype=bool)
    fmask[3] = False
    assert np.all(np.isfinite(pfwd(flat, CU, fmask, masked=masked)))
    if masked == "zero":  # only "zero" leaves the gradient at masked positions unread
        dz, dm0 = adj(z, mask, masked=masked)
        assert np.all(np.isfinite(dz)) and np.all(np.isfinite(dm0))


def test_empty_inputs_are_valid():
    assert fwd(np.zeros((0, 5))).shape == (0, 5)
    assert fwd(np.zeros((3, 0))).shape == (3, 0)
    dz, dm0 = adj(np.zeros((3, 0)))
    assert dz.shape == (3, 0) and np.array_equal(dm0, np.zeros(3))
    assert pfwd(np.zeros(0), np.array([0], dtype=np.int32)).shape == (0,)
    dz, dm0 = padj(np.zeros(0, np.float32), np.array([0, 0, 0]))
    assert dz.shape == (0,) and dm0.shape == (2,) and dm0.dtype == np.float32
    assert kpo_rs.gains(0).shape == (0,)


def test_inputs_are_never_modified():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5, 7)).astype(np.float32)
    mask = rng.random((5, 7)) < 0.5
    flat, fmask, cu = z.ravel().copy(), mask.ravel().copy(), np.array([0, 10, 10, 35])
    copies = [a.copy() for a in (z, mask, flat, fmask, cu)]
    for masked in ("hold", "zero"):
        fwd(z, mask, masked=masked)
        adj(z, mask, masked=masked)
        pfwd(flat, cu, fmask, masked=masked)
        padj(flat, cu, fmask, masked=masked)
    for before, after in zip(copies, (z, mask, flat, fmask, cu)):
        np.testing.assert_array_equal(before, after)


def test_lists_are_accepted():
    np.testing.assert_array_equal(
        fwd([[0.1, 0.2], [0.3, 0.4]]), fwd(np.array([[0.1, 0.2], [0.3, 0.4]]))
    )
    np.testing.assert_array_equal(
        pfwd([0.1, 0.2, 0.3], [0, 1, 3]), pfwd(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 3]))
    )
