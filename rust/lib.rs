//! kpo-rs: the causal Kalman filter of KPO (Kalman-filtered policy optimization) and its exact
//! adjoint, for padded and packed batches of token sequences.
//!
//! [`filter`] is the pure-Rust core. With the `python` feature (enabled by maturin) this crate is
//! also the Python extension module `kpo_rs._core`, defined in `python.rs`.

mod block;
pub mod filter;
mod stretch;

#[cfg(feature = "python")]
mod python;
