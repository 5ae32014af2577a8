//! kpo-rs: the causal Kalman filter of KPO (Kalman-filtered policy optimization) and its exact
//! adjoint, for padded and packed batches of token sequences.
//!
//! [`filter`] is the pure-Rust core's public face. The modules stack without cycles, each using
//! only those listed before it: `simd` (explicit SIMD row-block kernels per instruction set,
//! chosen at run time), `compact` (mask scans, compaction and expansion of rows with holes), `types` (shared types, parameters, errors, gains), `row` (one-row
//! kernels), `block` (row-block kernels: dispatch to `simd`, portable fallback), `stretch` (the
//! row-block path, long rows cut into stretches), `filter` (layout checks and dispatch),
//! `likelihood` (the model's log-likelihood per row, for fitting the settings), `premise`
//! (the premise metrics' statistics in one pass per row). With the
//! `python` feature (enabled by maturin) this crate is also the Python extension module
//! `kpo_rs._core`, defined in `python.rs`. See `docs/design.md`, "Rust core".

mod block;
mod compact;
pub mod filter;
pub mod likelihood;
pub mod premise;
mod ragged;
mod row;
mod simd;
mod stretch;
mod types;

#[cfg(feature = "python")]
mod python;
