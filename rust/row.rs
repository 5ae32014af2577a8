//! The one-row kernels: the forward recurrence and its adjoint over one row's values, for every
//! mask mode (`docs/design.md`, "Equations" and "Masks and holes"). Masks under
//! `MaskMode::Hold` give each row its own gain index, so those rows, and every packed row, run
//! here; the row-block kernels of `block.rs` do exactly the same arithmetic for rows that share
//! their gains.

use crate::types::{FilterError, Gains, MaskMode, Real};

/// Why one row failed (position relative to the row).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowFault {
    NonFinite(usize),
    Overflow,
}

impl RowFault {
    /// The error for this fault in row `row` of argument `arg`.
    pub(crate) fn at_row(self, arg: &'static str, row: usize) -> FilterError {
        match self {
            RowFault::NonFinite(pos) => FilterError::NonFinite { arg, row, pos },
            RowFault::Overflow => FilterError::Overflow { arg, row },
        }
    }
}

/// The first position the recurrence reads whose value is not finite.
pub(crate) fn first_bad<T: Real>(v: &[T], mask: Option<&[bool]>) -> RowFault {
    let pos = match mask {
        None => v.iter().position(|x| !x.is_finite()),
        Some(m) => v
            .iter()
            .zip(m)
            .position(|(x, &valid)| valid && !x.is_finite()),
    };
    pos.map_or(RowFault::Overflow, RowFault::NonFinite)
}

/// Forward recurrence over one row. `z`, `mask` and `out` have the row's length; `g` holds at least
/// that many gains.
pub(crate) fn forward_row<T: Real>(
    z: &[T],
    mask: Option<&[bool]>,
    g: &Gains<T>,
    m0: T,
    mode: MaskMode,
    out: &mut [T],
) -> Result<(), RowFault> {
    let len = z.len();
    let (k, a) = (&g.k()[..len], &g.a()[..len]);
    let mut x = m0;
    match (mask, mode) {
        (None, _) => {
            for (((o, &zt), &kt), &at) in out.iter_mut().zip(z).zip(k).zip(a) {
                x = at * x + kt * zt;
                *o = x;
            }
        }
        (Some(m), MaskMode::Hold) => {
            let mut n = 0;
            for ((o, &zt), &valid) in out.iter_mut().zip(z).zip(m) {
                if valid {
                    x = a[n] * x + k[n] * zt;
                    n += 1;
                }
                *o = x;
            }
        }
        (Some(m), MaskMode::Zero) => {
            for ((((o, &zt), &valid), &kt), &at) in out.iter_mut().zip(z).zip(m).zip(k).zip(a) {
                let obs = if valid { zt } else { T::ZERO };
                x = at * x + kt * obs;
                *o = if valid { x } else { T::ZERO };
            }
        }
    }
    if x.is_finite() {
        Ok(())
    } else {
        Err(first_bad(z, mask))
    }
}

/// Adjoint over one row: writes `dz = W^T g` and returns `d m0`.
pub(crate) fn adjoint_row<T: Real>(
    grad: &[T],
    mask: Option<&[bool]>,
    g: &Gains<T>,
    mode: MaskMode,
    dz: &mut [T],
) -> Result<T, RowFault> {
    let len = grad.len();
    let (k, a) = (&g.k()[..len], &g.a()[..len]);
    let mut lam = T::ZERO;
    // The positions whose upstream gradient the recurrence reads: all of them when the output at a
    // masked position is the held state, only the valid ones when it is zeroed.
    let read_mask = match mode {
        MaskMode::Hold => None,
        MaskMode::Zero => mask,
    };
    match (mask, mode) {
        (None, _) => {
            for (((d, &gt), &kt), &at) in dz.iter_mut().zip(grad).zip(k).zip(a).rev() {
                lam = lam + gt;
                *d = kt * lam;
                lam = at * lam;
            }
        }
        (Some(m), MaskMode::Hold) => {
            let mut n = m.iter().filter(|&&v| v).count();
            for ((d, &gt), &valid) in dz.iter_mut().zip(grad).zip(m).rev() {
                lam = lam + gt;
                if valid {
                    n -= 1;
                    *d = k[n] * lam;
                    lam = a[n] * lam;
                } else {
                    *d = T::ZERO;
                }
            }
        }
        (Some(m), MaskMode::Zero) => {
            for ((((d, &gt), &valid), &kt), &at) in
                dz.iter_mut().zip(grad).zip(m).zip(k).zip(a).rev()
            {
                if valid {
                    lam = lam + gt;
                    *d = kt * lam;
                } else {
                    *d = T::ZERO;
                }
                lam = at * lam;
            }
        }
    }
    if lam.is_finite() {
        Ok(lam)
    } else {
        Err(first_bad(grad, read_mask))
    }
}
