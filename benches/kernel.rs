//! Throughput of the Rust core's padded and packed forward kernels on one and two threads,
//! without Python in the way: `cargo bench --bench kernel` (B=rows, T=time to change the shape).
//! The packed path runs the one-row kernel; the padded path the row-block kernel.

use kpo_rs::filter::{filter_packed, filter_padded, FilterParams, Gains, MaskMode};
use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (b, t) = (env_or("B", 64), env_or("T", 4096));
    let z: Vec<f32> = (0..b * t)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let cu: Vec<i64> = (0..=b as i64).map(|i| i * t as i64).collect();
    let g = Gains::<f32>::new(t, &FilterParams::default()).expect("valid parameters");
    let mut out = vec![0f32; b * t];
    println!("{b} x {t} float32, best of 20");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        for name in ["padded (row blocks)", "packed (one row)"] {
            let mut best = f64::MAX;
            for _ in 0..20 {
                let start = Instant::now();
                let result = pool.install(|| {
                    if name.starts_with("padded") {
                        filter_padded(&z, None, b, t, &g, 0.0, MaskMode::Hold, &mut out)
                    } else {
                        filter_packed(&z, None, &cu, &g, 0.0, MaskMode::Hold, &mut out)
                    }
                });
                result.expect("finite input");
                best = best.min(start.elapsed().as_secs_f64());
            }
            println!(
                "threads {threads}  {name:20} {:.3e} tokens/s",
                (b * t) as f64 / best
            );
        }
    }
}
