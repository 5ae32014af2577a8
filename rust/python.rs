//! The Python extension module `kpo_rs._core`.
//!
//! Each function checks its arguments (type, dtype, dimensions, shapes, offsets, parameters),
//! takes read-only views of the numpy inputs (copying only arrays that are not C-contiguous), runs
//! the kernel of [`crate::filter`] with the GIL released, and returns new arrays. Every failure is
//! a `ValueError` or `TypeError` whose message names the argument; inputs are never written.
//!
//! Errors of the core become Python exceptions in one place (`From<FilterError> for PyErr`, with
//! the core's own message); dtypes are dispatched by extracting the typed enums [`Floats`] and
//! [`Offsets`].

use numpy::{
    Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::filter::{self, FilterError, FilterParams, Gains, MaskMode, Offset, Real};
use crate::likelihood::{self, RowStats};
use crate::premise::{self, Advantages, Clip, PremiseStats, Series};

/// Every error of the core is a `ValueError` carrying the core's message, which names the
/// argument (see `docs/design.md`, "Errors").
impl From<FilterError> for PyErr {
    fn from(err: FilterError) -> PyErr {
        PyValueError::new_err(err.to_string())
    }
}

/// A float array of either supported dtype.
#[derive(FromPyObject)]
enum Floats<'py> {
    F32(Bound<'py, PyArrayDyn<f32>>),
    F64(Bound<'py, PyArrayDyn<f64>>),
}

/// A `cu_seqlens` array of either supported dtype.
#[derive(FromPyObject)]
enum Offsets<'py> {
    I32(Bound<'py, PyArrayDyn<i32>>),
    I64(Bound<'py, PyArrayDyn<i64>>),
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

fn dtype_str(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype()
        .str()
        .map_or_else(|_| "?".to_owned(), |s| s.to_string())
}

/// `obj` as an ndarray of `ndim` dimensions.
fn as_ndarray<'a, 'py>(
    arg: &str,
    obj: &'a Bound<'py, PyAny>,
    ndim: usize,
    what: &str,
) -> PyResult<&'a Bound<'py, PyUntypedArray>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must be a numpy.ndarray, got {}",
            type_name(obj)
        ))
    })?;
    if arr.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{arg} must be {ndim}-D {what}, got a {}-D array of shape {:?}",
            arr.ndim(),
            arr.shape()
        )));
    }
    Ok(arr)
}

/// The float array `arr` by dtype, else a TypeError naming `arg`.
fn floats<'py>(arg: &str, arr: &Bound<'py, PyUntypedArray>) -> PyResult<Floats<'py>> {
    arr.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must have dtype float32 or float64, got {}",
            dtype_str(arr)
        ))
    })
}

/// The offsets array `arr` by dtype, else a TypeError.
fn offsets<'py>(arr: &Bound<'py, PyUntypedArray>) -> PyResult<Offsets<'py>> {
    arr.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "cu_seqlens must have dtype int32 or int64, got {}",
            dtype_str(arr)
        ))
    })
}

/// The elements of an input array in C (row-major) order: a read-only view of numpy's buffer
/// when it is C-contiguous, otherwise a copy read through the strides (Fortran order, strided and
/// negatively strided views).
enum Elems<'py, T: Element> {
    View(PyReadonlyArrayDyn<'py, T>),
    Owned(Vec<T>),
}

impl<T: Element> Elems<'_, T> {
    fn as_slice(&self) -> &[T] {
        match self {
            // A view is only made of C-contiguous arrays, whose slice always exists; were it
            // missing, the empty slice fails the kernels' length checks instead of misreading.
            Elems::View(ro) => ro.as_slice().unwrap_or(&[]),
            Elems::Owned(v) => v,
        }
    }
}

fn read<'py, T: Element + Copy>(
    arg: &str,
    arr: &Bound<'py, PyArrayDyn<T>>,
) -> PyResult<Elems<'py, T>> {
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{arg} cannot be read: {e}")))?;
    if arr.is_c_contiguous() && ro.as_slice().is_ok() {
        Ok(Elems::View(ro))
    } else {
        Ok(Elems::Owned(ro.as_array().iter().copied().collect()))
    }
}

/// A new numpy array of `len` elements for a kernel to fill, left uninitialised (`numpy.empty`):
/// zero-filling it first would cost a third of a small call.
///
/// Every kernel writes every element of its outputs before it reads any: each row, block and
/// segment is written whole by the one-row kernels (`row.rs`) or the block kernels (`block.rs`,
/// `simd.rs`; `stretch.rs` only adds to what they wrote), and `dm0` once per row (`filter.rs`).
/// An output of a call that fails is dropped without being read or returned.
fn output<T: Element>(py: Python<'_>, len: usize) -> Bound<'_, PyArray1<T>> {
    // SAFETY: `T` is a float or integer type, for which every bit pattern is a value, and the
    // array is fully written before Python sees it (see above).
    unsafe { PyArray1::<T>::new(py, len, false) }
}

/// Runs a kernel with the GIL released: computes the gains of `n` positions for `params` and
/// hands them to `kernel` with `N` new arrays ([`output`]) of `lens` elements, which it fills;
/// returns the arrays.
fn run_kernel<'py, T: Real + Element, const N: usize>(
    py: Python<'py>,
    lens: [usize; N],
    n: usize,
    params: &FilterParams,
    kernel: impl Send + FnOnce(&Gains<T>, [&mut [T]; N]) -> Result<(), FilterError>,
) -> PyResult<[Bound<'py, PyArray1<T>>; N]> {
    let outs = lens.map(|len| output::<T>(py, len));
    let mut rws = outs.each_ref().map(|o| o.readwrite());
    // A new array is C-contiguous, so its slice always exists. Were it missing, the empty slice
    // would fail the kernels' length checks of every output before anything is written (a
    // `ValueError`: "out: has 0 elements, expected ..."), as `Elems::as_slice` does for inputs.
    let slices = rws
        .each_mut()
        .map(|rw| rw.as_slice_mut().unwrap_or(&mut []));
    py.detach(|| kernel(&Gains::<T>::new(n, params)?, slices))?;
    drop(rws);
    Ok(outs)
}

fn parse_mode(masked: &str) -> PyResult<MaskMode> {
    match masked {
        "hold" => Ok(MaskMode::Hold),
        "zero" => Ok(MaskMode::Zero),
        other => Err(PyValueError::new_err(format!(
            "masked must be 'hold' or 'zero', got {other:?}"
        ))),
    }
}

fn params(q: f64, r: f64, p0: f64) -> PyResult<FilterParams> {
    let p = FilterParams { q, r, p0 };
    p.validate()?;
    Ok(p)
}

/// The mask, checked to be a bool array of exactly `shape`.
fn read_mask<'py>(
    mask: Option<&Bound<'py, PyAny>>,
    shape: &[usize],
    values_arg: &str,
) -> PyResult<Option<Elems<'py, bool>>> {
    let Some(obj) = mask.filter(|m| !m.is_none()) else {
        return Ok(None);
    };
    let arr = as_ndarray("mask", obj, shape.len(), "like values")?;
    let typed = arr.cast::<PyArrayDyn<bool>>().map_err(|_| {
        PyTypeError::new_err(format!("mask must have dtype bool, got {}", dtype_str(arr)))
    })?;
    if arr.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "mask shape {:?} differs from {values_arg} shape {:?}",
            arr.shape(),
            shape
        )));
    }
    read("mask", typed).map(Some)
}

/// The checked arguments the two filter functions share besides the array they filter.
struct Settings<'py> {
    mask: Option<Elems<'py, bool>>,
    params: FilterParams,
    mode: MaskMode,
}

impl Settings<'_> {
    fn mask(&self) -> Option<&[bool]> {
        self.mask.as_ref().map(Elems::as_slice)
    }
}

/// The array a function filters (or whose adjoint it takes), named `arg`, and the offsets of its
/// rows: padded `[batch, time]` when `cu_seqlens` is None, packed `[total]` otherwise.
fn layout<'a, 'py>(
    arg: &str,
    obj: &'a Bound<'py, PyAny>,
    cu_seqlens: Option<&'a Bound<'py, PyAny>>,
) -> PyResult<(
    &'a Bound<'py, PyUntypedArray>,
    Option<&'a Bound<'py, PyUntypedArray>>,
)> {
    match cu_seqlens.filter(|c| !c.is_none()) {
        None => Ok((as_ndarray(arg, obj, 2, "[batch, time]")?, None)),
        Some(cu) => Ok((
            as_ndarray(arg, obj, 1, "[total]")?,
            Some(as_ndarray("cu_seqlens", cu, 1, "[batch + 1]")?),
        )),
    }
}

/// Checks what the two filter functions share, in the order their errors are reported:
/// `masked`, the parameters, the mask (against the shape of `arr`, the argument named `arg`),
/// then the dtype of `arr`.
fn settings<'py>(
    arg: &str,
    arr: &Bound<'py, PyUntypedArray>,
    mask: Option<&Bound<'py, PyAny>>,
    (q, r, p0): (f64, f64, f64),
    masked: &str,
) -> PyResult<(Floats<'py>, Settings<'py>)> {
    let mode = parse_mode(masked)?;
    let params = params(q, r, p0)?;
    let mask = read_mask(mask, arr.shape(), arg)?;
    Ok((floats(arg, arr)?, Settings { mask, params, mode }))
}

/// `$body` with `$x` bound to the typed array of `$e`, a [`Floats`] or an [`Offsets`]: the body is
/// compiled once per dtype.
macro_rules! by_dtype {
    (Floats, $e:expr, $x:ident => $body:expr) => {
        match $e {
            Floats::F32($x) => $body,
            Floats::F64($x) => $body,
        }
    };
    (Offsets, $e:expr, $x:ident => $body:expr) => {
        match $e {
            Offsets::I32($x) => $body,
            Offsets::I64($x) => $body,
        }
    };
}

/// `K_0 .. K_{n-1}` as a float64 array `[n]`.
#[pyfunction]
fn gains<'py>(
    py: Python<'py>,
    n: i64,
    q: f64,
    r: f64,
    p0: f64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let n = usize::try_from(n)
        .map_err(|_| PyValueError::new_err(format!("n must be >= 0, got {n}")))?;
    let p = params(q, r, p0)?;
    let k = py.detach(|| filter::gains(n, &p))?;
    Ok(PyArray1::from_vec(py, k))
}

fn padded_shape<T: Element>(arr: &Bound<'_, PyArrayDyn<T>>) -> (usize, usize) {
    let s = arr.shape();
    (s[0], s[1])
}

fn filter_padded_typed<'py, T: Real + Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    s: Settings<'py>,
    m0: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let (batch, time) = padded_shape(arr);
    let values = read("values", arr)?;
    let (z, m) = (values.as_slice(), s.mask());
    let [out] = run_kernel(arr.py(), [z.len()], time, &s.params, |g, [o]| {
        filter::filter_padded(z, m, batch, time, g, T::from_f64(m0), s.mode, o)
    })?;
    Ok(out.reshape([batch, time])?.into_any())
}

type Pair<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

fn adjoint_padded_typed<'py, T: Real + Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    s: Settings<'py>,
) -> PyResult<Pair<'py>> {
    let (batch, time) = padded_shape(arr);
    let grad = read("grad", arr)?;
    let (gr, m) = (grad.as_slice(), s.mask());
    let [dz, dm0] = run_kernel(
        arr.py(),
        [gr.len(), batch],
        time,
        &s.params,
        |g, [d, dm]| filter::adjoint_padded(gr, m, batch, time, g, s.mode, d, dm),
    )?;
    Ok((dz.reshape([batch, time])?.into_any(), dm0.into_any()))
}

/// Reads `cu_seqlens`, checks it against `total` values, and returns it with the longest segment.
fn read_offsets<'py, O: Offset + Element>(
    arr: &Bound<'py, PyArrayDyn<O>>,
    total: usize,
) -> PyResult<(Elems<'py, O>, usize)> {
    let offsets = read("cu_seqlens", arr)?;
    let idx = filter::check_offsets(offsets.as_slice(), total)?;
    Ok((offsets, filter::max_segment(&idx)))
}

/// Checks `cu_seqlens` `[batch + 1]` (int32/int64) against `total` values; returns the length of
/// the longest segment.
#[pyfunction]
fn check_offsets(cu_seqlens: &Bound<'_, PyAny>, total: i64) -> PyResult<usize> {
    let total = usize::try_from(total)
        .map_err(|_| PyValueError::new_err(format!("total must be >= 0, got {total}")))?;
    let cu = as_ndarray("cu_seqlens", cu_seqlens, 1, "[batch + 1]")?;
    Ok(by_dtype!(Offsets, offsets(cu)?, c => read_offsets(&c, total)?.1))
}

fn filter_packed_typed<'py, T: Real + Element, O: Offset + Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    cu: &Bound<'py, PyArrayDyn<O>>,
    s: Settings<'py>,
    m0: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let values = read("values", arr)?;
    let (offsets, longest) = read_offsets(cu, values.as_slice().len())?;
    let (z, m, cu) = (values.as_slice(), s.mask(), offsets.as_slice());
    let [out] = run_kernel(arr.py(), [z.len()], longest, &s.params, |g, [o]| {
        filter::filter_packed(z, m, cu, g, T::from_f64(m0), s.mode, o)
    })?;
    Ok(out.into_any())
}

fn adjoint_packed_typed<'py, T: Real + Element, O: Offset + Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    cu: &Bound<'py, PyArrayDyn<O>>,
    s: Settings<'py>,
) -> PyResult<Pair<'py>> {
    let grad = read("grad", arr)?;
    let (offsets, longest) = read_offsets(cu, grad.as_slice().len())?;
    let (gr, m, cu) = (grad.as_slice(), s.mask(), offsets.as_slice());
    let batch = cu.len() - 1;
    let [dz, dm0] = run_kernel(
        arr.py(),
        [gr.len(), batch],
        longest,
        &s.params,
        |g, [d, dm]| filter::adjoint_packed(gr, m, cu, g, s.mode, d, dm),
    )?;
    Ok((dz.into_any(), dm0.into_any()))
}

/// Filters the rows of `values` (float32/float64): padded `[batch, time]` when `cu_seqlens` is
/// None, else packed `[total]` split by `cu_seqlens` `[batch + 1]` (int32/int64). Returns the
/// filtered values, shaped like `values`.
#[pyfunction]
#[pyo3(name = "filter", signature = (values, cu_seqlens, mask, variances, m0, masked))]
fn filter_rows<'py>(
    values: &Bound<'py, PyAny>,
    cu_seqlens: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
    variances: (f64, f64, f64),
    m0: f64,
    masked: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let (arr, cu) = layout("values", values, cu_seqlens)?;
    let (floats, s) = settings("values", arr, mask, variances, masked)?;
    match cu {
        None => by_dtype!(Floats, floats, a => filter_padded_typed(&a, s, m0)),
        Some(cu) => by_dtype!(Floats, floats, a => by_dtype!(Offsets, offsets(cu)?, c => {
            filter_packed_typed(&a, &c, s, m0)
        })),
    }
}

/// Adjoint of `filter` for the upstream gradient `grad` (either layout): returns
/// `(dvalues` shaped like `grad`, `dm0 [batch])`.
#[pyfunction]
#[pyo3(name = "adjoint", signature = (grad, cu_seqlens, mask, variances, masked))]
fn adjoint_rows<'py>(
    grad: &Bound<'py, PyAny>,
    cu_seqlens: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
    variances: (f64, f64, f64),
    masked: &str,
) -> PyResult<Pair<'py>> {
    let (arr, cu) = layout("grad", grad, cu_seqlens)?;
    let (floats, s) = settings("grad", arr, mask, variances, masked)?;
    match cu {
        None => by_dtype!(Floats, floats, a => adjoint_padded_typed(&a, s)),
        Some(cu) => by_dtype!(Floats, floats, a => by_dtype!(Offsets, offsets(cu)?, c => {
            adjoint_packed_typed(&a, &c, s)
        })),
    }
}

/// Runs a likelihood kernel with the GIL released into a new float64 `[batch, 7]` array
/// (the columns of [`RowStats::to_array`]).
fn stats_array<'py>(
    py: Python<'py>,
    batch: usize,
    kernel: impl Send + FnOnce(&mut [RowStats]) -> Result<(), FilterError>,
) -> PyResult<Bound<'py, PyAny>> {
    let rows = py.detach(|| {
        let mut rows = vec![RowStats::default(); batch];
        kernel(&mut rows).map(|()| rows)
    })?;
    let flat: Vec<f64> = rows.iter().flat_map(RowStats::to_array).collect();
    Ok(PyArray1::from_vec(py, flat)
        .reshape([batch, RowStats::COLUMNS])?
        .into_any())
}

fn innovations_padded_typed<'py, T: Real + Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    mask: Option<Elems<'py, bool>>,
    params: FilterParams,
    m0: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let (batch, time) = padded_shape(arr);
    let values = read("values", arr)?;
    let (z, m) = (values.as_slice(), mask.as_ref().map(Elems::as_slice));
    stats_array(arr.py(), batch, |out| {
        likelihood::likelihood_padded(z, m, batch, time, &params, m0, out)
    })
}

fn innovations_packed_typed<'py, T: Real + Element, O: Offset + Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    cu: &Bound<'py, PyArrayDyn<O>>,
    mask: Option<Elems<'py, bool>>,
    params: FilterParams,
    m0: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let values = read("values", arr)?;
    let z = values.as_slice();
    let (offsets, _) = read_offsets(cu, z.len())?;
    let (m, cu) = (mask.as_ref().map(Elems::as_slice), offsets.as_slice());
    stats_array(arr.py(), cu.len() - 1, |out| {
        likelihood::likelihood_packed(z, m, cu, &params, m0, out)
    })
}

/// The sums of the innovations of each row of `values` (either layout, masked positions skipped
/// as `masked="hold"` skips them): float64 `[batch, 7]` with columns `log_likelihood, tokens,
/// terms, log_det, ssq, cross, c2` (see `rust/likelihood.rs`).
#[pyfunction]
#[pyo3(signature = (values, cu_seqlens, mask, variances, m0))]
fn innovations<'py>(
    values: &Bound<'py, PyAny>,
    cu_seqlens: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
    variances: (f64, f64, f64),
    m0: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let (arr, cu) = layout("values", values, cu_seqlens)?;
    let (floats, s) = settings("values", arr, mask, variances, "hold")?;
    let Settings { mask, params, .. } = s;
    match cu {
        None => by_dtype!(Floats, floats, a => innovations_padded_typed(&a, mask, params, m0)),
        Some(cu) => by_dtype!(Floats, floats, a => by_dtype!(Offsets, offsets(cu)?, c => {
            innovations_packed_typed(&a, &c, mask, params, m0)
        })),
    }
}

/// `arr` as an array of `T`, else a TypeError naming `arg` and the dtype `like` it must have.
fn typed<'py, T: Element>(
    arg: &str,
    arr: &Bound<'py, PyUntypedArray>,
    like: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    arr.cast::<PyArrayDyn<T>>().cloned().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg} must have dtype {like}, got {}",
            dtype_str(arr)
        ))
    })
}

/// The clip's arrays as handed in: `(advantages, rt, clipped)`.
type ClipArgs<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);

/// The statistics of [`premise_stats`] for series of dtype `T`, flattened.
fn premise_typed<'py, T: Real + Element>(
    py: Python<'py>,
    arrs: &[&Bound<'py, PyUntypedArray>],
    lags: &[Vec<usize>],
    cu: Option<&Bound<'py, PyUntypedArray>>,
    mask: Option<Elems<'py, bool>>,
    clip: Option<&ClipArgs<'py>>,
) -> PyResult<Vec<f64>> {
    let like = dtype_str(arrs[0]);
    let shape = arrs[0].shape().to_vec();
    let mut values = Vec::with_capacity(arrs.len());
    for (i, arr) in arrs.iter().enumerate() {
        let arg = format!("series[{i}]");
        if arr.shape() != shape {
            return Err(PyValueError::new_err(format!(
                "{arg} shape {:?} differs from series[0] shape {shape:?}",
                arr.shape()
            )));
        }
        values.push(read(&arg, &typed::<T>(&arg, arr, &like)?)?);
    }
    let clip_elems = match clip {
        None => None,
        Some((adv, rt, clipped)) => {
            let adv = as_ndarray("advantages", adv, shape.len(), "like the series")?;
            let per_row = cu.is_none() && adv.shape() == [shape[0], 1];
            if adv.shape() != shape && !per_row {
                return Err(PyValueError::new_err(format!(
                    "advantages shape {:?} differs from the series' shape {shape:?}{}",
                    adv.shape(),
                    if cu.is_none() {
                        " and from [batch, 1]"
                    } else {
                        ""
                    }
                )));
            }
            let rt = as_ndarray("rt", rt, shape.len(), "like the series")?;
            let clipped = as_ndarray("clipped", clipped, shape.len(), "like the series")?;
            for (arg, a) in [("rt", rt), ("clipped", clipped)] {
                if a.shape() != shape {
                    return Err(PyValueError::new_err(format!(
                        "{arg} shape {:?} differs from the series' shape {shape:?}",
                        a.shape()
                    )));
                }
            }
            Some((
                read("advantages", &typed::<T>("advantages", adv, &like)?)?,
                per_row,
                read("rt", &typed::<T>("rt", rt, &like)?)?,
                read("clipped", &typed::<bool>("clipped", clipped, "bool")?)?,
            ))
        }
    };
    let series: Vec<Series<'_, T>> = values
        .iter()
        .zip(lags)
        .map(|(v, l)| Series {
            values: v.as_slice(),
            lags: l,
        })
        .collect();
    let clip = clip_elems.as_ref().map(|(a, per_row, rt, cl)| Clip {
        advantages: if *per_row {
            Advantages::Rows(a.as_slice())
        } else {
            Advantages::Tokens(a.as_slice())
        },
        rt: rt.as_slice(),
        clipped: cl.as_slice(),
    });
    let m = mask.as_ref().map(Elems::as_slice);
    let stats: PremiseStats = match cu {
        None => {
            let (batch, time) = (shape[0], shape[1]);
            py.detach(|| premise::premise_padded(&series, m, batch, time, clip.as_ref()))?
        }
        Some(cu) => by_dtype!(Offsets, offsets(cu)?, c => {
            let o = read("cu_seqlens", &c)?;
            let o = o.as_slice();
            py.detach(|| premise::premise_packed(&series, m, o, clip.as_ref()))?
        }),
    };
    let mut flat = Vec::new();
    for s in &stats.series {
        flat.extend([s.mean, s.std]);
        flat.extend(&s.acf);
    }
    if let Some((pos, neg)) = stats.clip {
        flat.extend([pos, neg]);
    }
    Ok(flat)
}

/// The premise metrics' statistics (see `rust/premise.rs`; accumulated in float64) of one or
/// more `series` of one dtype and layout (padded `[batch, time]`, or packed `[total]` with
/// `cu_seqlens`), with `lags[i]` the lags of `series[i]`, and the clip's removed shares when
/// `clip = (advantages, rt, clipped)` is given (`advantages` like the series, or `[batch, 1]`
/// when padded). Returns float64: per series `mean, std, acf at each lag`, then `share_pos,
/// share_neg` with a clip.
#[pyfunction]
#[pyo3(name = "premise", signature = (series, lags, cu_seqlens, mask, clip))]
fn premise_stats<'py>(
    py: Python<'py>,
    series: Vec<Bound<'py, PyAny>>,
    lags: Vec<Vec<i64>>,
    cu_seqlens: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
    clip: Option<ClipArgs<'py>>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let Some(first) = series.first() else {
        return Err(PyValueError::new_err("series must hold at least one array"));
    };
    if lags.len() != series.len() {
        return Err(PyValueError::new_err(format!(
            "lags must hold one list per series ({}), got {}",
            series.len(),
            lags.len()
        )));
    }
    let lags =
        lags.iter()
            .map(|l| {
                l.iter()
                    .map(|&k| {
                        usize::try_from(k).ok().filter(|&k| k >= 1).ok_or_else(|| {
                            PyValueError::new_err(format!("lags must be >= 1, got {k}"))
                        })
                    })
                    .collect::<PyResult<Vec<usize>>>()
            })
            .collect::<PyResult<Vec<_>>>()?;
    let (arr, cu) = layout("series[0]", first, cu_seqlens)?;
    let mut arrs = vec![arr];
    for (i, obj) in series.iter().enumerate().skip(1) {
        let what = if cu.is_none() {
            "[batch, time]"
        } else {
            "[total]"
        };
        arrs.push(as_ndarray(&format!("series[{i}]"), obj, arr.ndim(), what)?);
    }
    let mask = read_mask(mask, arr.shape(), "series[0]")?;
    let clip = clip.as_ref();
    let flat = match floats("series[0]", arr)? {
        Floats::F32(_) => premise_typed::<f32>(py, &arrs, &lags, cu, mask, clip)?,
        Floats::F64(_) => premise_typed::<f64>(py, &arrs, &lags, cu, mask, clip)?,
    };
    Ok(PyArray1::from_vec(py, flat))
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(gains, m)?)?;
    m.add_function(wrap_pyfunction!(check_offsets, m)?)?;
    m.add_function(wrap_pyfunction!(filter_rows, m)?)?;
    m.add_function(wrap_pyfunction!(adjoint_rows, m)?)?;
    m.add_function(wrap_pyfunction!(innovations, m)?)?;
    m.add_function(wrap_pyfunction!(premise_stats, m)?)?;
    Ok(())
}
