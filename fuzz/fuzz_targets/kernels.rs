//! Arbitrary layouts for the packed and padded kernels, forward and adjoint: offsets that may be
//! negative, decreasing, past the end or not ending at the total; masks of any length; shapes
//! that do not match the data; non-finite values; every mode. The kernels must return `Ok` or an
//! error and never panic or read out of bounds.
#![no_main]

use kpo_rs::filter::{
    adjoint_packed, adjoint_padded, filter_packed, filter_padded, FilterParams, Gains, MaskMode,
};
use libfuzzer_sys::fuzz_target;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, tail) = data.split_at(n);
    *data = tail;
    head
}

fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let flags = byte(&mut data);
    let mode = if flags & 1 == 0 { MaskMode::Hold } else { MaskMode::Zero };
    let params = FilterParams {
        q: [0.0, 1e-6, 0.5, f64::INFINITY][(flags >> 1 & 3) as usize],
        r: 1.0,
        p0: [0.0, f64::INFINITY][(flags >> 3 & 1) as usize],
    };
    let n_values = byte(&mut data) as usize;
    let values: Vec<f32> = take(&mut data, n_values)
        .iter()
        .map(|&b| match b {
            255 => f32::NAN,
            254 => f32::INFINITY,
            _ => (b as f32 - 128.0) / 16.0,
        })
        .collect();
    let n_mask = byte(&mut data) as usize;
    let mask: Vec<bool> = take(&mut data, n_mask).iter().map(|&b| b & 1 == 1).collect();
    let mask = (flags & 16 != 0).then_some(mask.as_slice());
    let n_offsets = byte(&mut data) as usize % 16;
    let offsets: Vec<i64> = take(&mut data, n_offsets)
        .iter()
        .map(|&b| b as i8 as i64)
        .collect();
    let gains = Gains::<f32>::new(byte(&mut data) as usize, &params).unwrap();
    let mut out = vec![0f32; byte(&mut data) as usize];
    let mut dm0 = vec![0f32; byte(&mut data) as usize % 32];
    let _ = filter_packed(&values, mask, &offsets, &gains, 0.5, mode, &mut out);
    let _ = adjoint_packed(&values, mask, &offsets, &gains, mode, &mut out, &mut dm0);
    let batch = byte(&mut data) as usize % 16;
    let time = byte(&mut data) as usize % 64;
    let _ = filter_padded(&values, mask, batch, time, &gains, 0.5, mode, &mut out);
    let _ = adjoint_padded(&values, mask, batch, time, &gains, mode, &mut out, &mut dm0);
});
