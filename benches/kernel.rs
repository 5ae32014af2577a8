//! Throughput of the Rust core's kernels on one and two threads, without Python in the way:
//! `cargo bench --bench kernel` (B=rows, T=time to change the shape, REPEATS the number of timed
//! calls per case, THREADS=1,2 the thread counts, CASES=name,name to run only some cases, FULL=1
//! every row full length: the masked and packed paths' own cost against the unmasked one).
//! Unmasked padded calls run the row-block kernels (explicit SIMD for the best instruction set
//! the CPU has); masked and packed calls run them through `ragged.rs` (rows of their own
//! lengths; rows with holes compacted under "hold", zeroed under "zero"). The layouts are those of
//! `python benches/run.py --layouts`: rows of T/2 to T valid tokens, right-padded; the same rows
//! packed; a tenth of their valid tokens masked (holes). Prints the best and the median call as
//! valid tokens per second, and the best's ratio to the unmasked forward's.

use kpo_rs::filter::{
    adjoint_packed, adjoint_padded, filter_packed, filter_padded, FilterParams, Gains, MaskMode,
};
use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn main() {
    let (b, t) = (env_or("B", 64), env_or("T", 4096));
    let repeats = env_or("REPEATS", 200).max(1);
    let threads: Vec<usize> = std::env::var("THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    let only = std::env::var("CASES").ok();
    let z: Vec<f32> = (0..b * t)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut rng = Rng(1);
    let full_rows = std::env::var("FULL").is_ok();
    let lens: Vec<usize> = (0..b)
        .map(|_| t / 2 + (rng.next() as usize) % (t - t / 2 + 1))
        .map(|n| if full_rows { t } else { n })
        .collect();
    let prefix: Vec<bool> = (0..b * t).map(|i| i % t < lens[i / t]).collect();
    let holes: Vec<bool> = prefix
        .iter()
        .map(|&v| v && !rng.next().is_multiple_of(10))
        .collect();
    let packed: Vec<f32> = z
        .iter()
        .zip(&prefix)
        .filter(|p| *p.1)
        .map(|p| *p.0)
        .collect();
    let cu: Vec<i64> = std::iter::once(0)
        .chain(lens.iter().scan(0i64, |acc, &l| {
            *acc += l as i64;
            Some(*acc)
        }))
        .collect();
    let (full, valid) = (b * t, packed.len());
    let kept = holes.iter().filter(|&&v| v).count();
    let g = Gains::<f32>::new(t, &FilterParams::default()).expect("valid parameters");
    let (mut out, mut dm0) = (vec![0f32; b * t], vec![0f32; b]);
    let (hold, zero) = (MaskMode::Hold, MaskMode::Zero);
    println!("{b} x {t} float32, {repeats} calls per case, valid tokens per second");
    for &threads in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        let mut base = 0.0;
        for (name, tokens) in [
            ("forward", full),
            ("adjoint", full),
            ("padded mask forward", valid),
            ("padded mask adjoint", valid),
            ("packed forward", valid),
            ("packed adjoint", valid),
            ("holes hold forward", kept),
            ("holes hold adjoint", kept),
            ("holes zero forward", kept),
            ("holes zero adjoint", kept),
        ] {
            if only
                .as_ref()
                .is_some_and(|o| !o.split(',').any(|c| c == name))
            {
                continue;
            }
            let mut times = Vec::with_capacity(repeats);
            for _ in 0..=repeats {
                let start = Instant::now();
                let (o, d) = (&mut out, &mut dm0);
                let result = pool.install(|| match name {
                    "forward" => filter_padded(&z, None, b, t, &g, 0.0, hold, o),
                    "adjoint" => adjoint_padded(&z, None, b, t, &g, hold, o, d),
                    "padded mask forward" => {
                        filter_padded(&z, Some(&prefix), b, t, &g, 0.0, hold, o)
                    }
                    "padded mask adjoint" => {
                        adjoint_padded(&z, Some(&prefix), b, t, &g, hold, o, d)
                    }
                    "packed forward" => {
                        filter_packed(&packed, None, &cu, &g, 0.0, hold, &mut o[..valid])
                    }
                    "packed adjoint" => {
                        adjoint_packed(&packed, None, &cu, &g, hold, &mut o[..valid], d)
                    }
                    "holes hold forward" => filter_padded(&z, Some(&holes), b, t, &g, 0.0, hold, o),
                    "holes hold adjoint" => adjoint_padded(&z, Some(&holes), b, t, &g, hold, o, d),
                    "holes zero forward" => filter_padded(&z, Some(&holes), b, t, &g, 0.0, zero, o),
                    _ => adjoint_padded(&z, Some(&holes), b, t, &g, zero, o, d),
                });
                result.expect("finite input");
                times.push(start.elapsed().as_secs_f64());
            }
            times.remove(0); // warm-up
            times.sort_by(f64::total_cmp);
            let rate = |s: f64| tokens as f64 / s;
            if name == "forward" {
                base = rate(times[0]);
            }
            println!(
                "threads {threads}  {name:20} best {:.3e}  median {:.3e}  / forward {:.2}",
                rate(times[0]),
                rate(times[times.len() / 2]),
                rate(times[0]) / base
            );
        }
    }
}
