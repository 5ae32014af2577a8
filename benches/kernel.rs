//! Throughput of the Rust core's kernels on one and two threads, without Python in the way:
//! `cargo bench --bench kernel` (B=rows, T=time to change the shape, REPEATS the number of timed
//! calls per case). Padded calls run the row-block kernels (explicit SIMD for the best
//! instruction set the CPU has) except under a hold mask, where they run the one-row kernel, as
//! packed calls do. Prints the best and the median call as tokens per second.

use kpo_rs::filter::{adjoint_padded, filter_packed, filter_padded, FilterParams, Gains, MaskMode};
use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (b, t) = (env_or("B", 64), env_or("T", 4096));
    let repeats = env_or("REPEATS", 200).max(1);
    let z: Vec<f32> = (0..b * t)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    // About one position in ten masked, at scattered places.
    let mut s = 1u64;
    let mask: Vec<bool> = (0..b * t)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            !(s >> 33).is_multiple_of(10)
        })
        .collect();
    let cu: Vec<i64> = (0..=b as i64).map(|i| i * t as i64).collect();
    let g = Gains::<f32>::new(t, &FilterParams::default()).expect("valid parameters");
    let (mut out, mut dm0) = (vec![0f32; b * t], vec![0f32; b]);
    println!("{b} x {t} float32, {repeats} calls per case");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        for name in [
            "padded forward",
            "padded adjoint",
            "hold mask forward",
            "hold mask adjoint",
            "packed forward",
        ] {
            let mut times = Vec::with_capacity(repeats);
            for _ in 0..=repeats {
                let start = Instant::now();
                let result = pool.install(|| match name {
                    "padded forward" => {
                        filter_padded(&z, None, b, t, &g, 0.0, MaskMode::Hold, &mut out)
                    }
                    "padded adjoint" => {
                        adjoint_padded(&z, None, b, t, &g, MaskMode::Hold, &mut out, &mut dm0)
                    }
                    "hold mask forward" => {
                        filter_padded(&z, Some(&mask), b, t, &g, 0.0, MaskMode::Hold, &mut out)
                    }
                    "hold mask adjoint" => adjoint_padded(
                        &z,
                        Some(&mask),
                        b,
                        t,
                        &g,
                        MaskMode::Hold,
                        &mut out,
                        &mut dm0,
                    ),
                    _ => filter_packed(&z, None, &cu, &g, 0.0, MaskMode::Hold, &mut out),
                });
                result.expect("finite input");
                times.push(start.elapsed().as_secs_f64());
            }
            times.remove(0); // warm-up
            times.sort_by(f64::total_cmp);
            let rate = |s: f64| (b * t) as f64 / s;
            println!(
                "threads {threads}  {name:16} best {:.3e}  median {:.3e} tokens/s",
                rate(times[0]),
                rate(times[times.len() / 2])
            );
        }
    }
}
