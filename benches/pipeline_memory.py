"""Peak memory and throughput of `kpo filter` on a large Parquet file of rollouts.

Writes a file of --tokens tokens (float32 log-probs and old log-probs, responses of 200 to 4000
tokens, row groups of 256 responses) without holding it in memory, then runs `kpo filter` on it
in a child process and reports the child's peak RSS next to the peak RSS of a child that only
imports the same modules, and the throughput in tokens per second next to that of a plain
pyarrow job on the same file: read the same batches, compute the log-ratio and its exp with
pyarrow.compute, write both as new columns with the same writer settings
(kpo_rs.pipeline.writer_options). The ratio of the two is what the filter itself, its checks and
its bookkeeping cost; the target is >= 0.85. Each job runs --repeats times; the best and the
spread are reported.

``--writers`` also runs the plain job with pyarrow's default writer settings and with dictionary
encoding off, next to the chosen ones, and reports each one's speed and output size: the
measurement behind ``writer_options``.

Run: python benches/pipeline_memory.py [--tokens 50000000] [--dir /tmp] [--repeats 3] [--writers]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_file(path: Path, tokens: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    written = rows = 0
    schema = pa.schema(
        [("id", pa.int64()), ("logp", pa.list_(pa.float32())), ("old_logp", pa.list_(pa.float32()))]
    )
    with pq.ParquetWriter(path, schema) as writer:
        while written < tokens:
            lengths = rng.integers(200, 4000, 256)
            lengths = (
                lengths[np.cumsum(lengths) <= tokens - written]
                if lengths.sum() > tokens - written
                else lengths
            )
            if lengths.size == 0:
                lengths = np.array([tokens - written])
            n = int(lengths.sum())
            old = (-rng.random(n) * 3).astype(np.float32)
            new = (old + rng.normal(0, 0.2, n)).astype(np.float32)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            batch = pa.record_batch(
                [
                    pa.array(np.arange(rows, rows + lengths.size)),
                    pa.ListArray.from_arrays(offsets, new),
                    pa.ListArray.from_arrays(offsets, old),
                ],
                schema=schema,
            )
            writer.write_batch(batch)
            written += n
            rows += lengths.size
    return rows


def child_peak_mb(code: str, *args: str) -> tuple[float, float, str]:
    """Runs ``code`` in a fresh interpreter; returns (the peak RSS of the children so far in MB,
    seconds, its stdout)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return peak, seconds, out.stdout.decode()


IMPORTS = "import kpo_rs, kpo_rs.pipeline, pyarrow.parquet, pyarrow.compute"

# kpo filter's job as a library call; prints the seconds of the job itself (no start-up).
FILTER_JOB = (
    IMPORTS + "\nimport sys\nfrom kpo_rs.pipeline import Columns, filter_parquet\n"
    "s = filter_parquet(sys.argv[1], sys.argv[2], Columns('logp', 'old_logp'),\n"
    "                   batch_size=int(sys.argv[3]))\n"
    "print(s.seconds)"
)

# The plain pyarrow job: same batches, log-ratio and its exp, the same writer settings.
PLAIN_JOB = (
    IMPORTS + "\nimport sys, time\nimport pyarrow as pa, pyarrow.compute as pc\n"
    "import pyarrow.parquet as pq\nfrom kpo_rs.pipeline import writer_options\n"
    "WRITERS = {\n"
    "    'chosen': writer_options,\n"
    "    'pyarrow default': lambda schema: {},\n"
    "    'no dictionary': lambda schema: {'use_dictionary': False},\n"
    "}\n"
    "options = WRITERS[sys.argv[4] if len(sys.argv) > 4 else 'chosen']\n"
    "start = time.perf_counter()\n"
    "pf = pq.ParquetFile(sys.argv[1])\n"
    "writer = None\n"
    "for g in range(pf.num_row_groups):\n"
    "    for b in pf.iter_batches(batch_size=int(sys.argv[3]), row_groups=[g]):\n"
    "        lp, old = b.column(1), b.column(2)\n"
    "        z = pc.subtract(lp.flatten(), old.flatten())\n"
    "        offsets = lp.offsets\n"
    "        b = b.append_column('log_ratio', pa.ListArray.from_arrays(offsets, z))\n"
    "        b = b.append_column('ratio', pa.ListArray.from_arrays(offsets, pc.exp(z)))\n"
    "        if writer is None:\n"
    "            writer = pq.ParquetWriter(sys.argv[2], b.schema, **options(b.schema))\n"
    "        writer.write_batch(b)\n"
    "writer.close()\n"
    "print(time.perf_counter() - start)"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writers", action="store_true", help="compare writer settings too")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    src, dst = folder / "rollouts.parquet", folder / "filtered.parquet"
    rows = write_file(src, args.tokens)
    size_mb = os.path.getsize(src) / 2**20
    base_mb, _, _ = child_peak_mb(IMPORTS)
    print(f"file: {rows} responses, {args.tokens} tokens, {size_mb:.0f} MiB on disk")
    job_args = (str(src), str(dst), str(args.batch_size))
    times: dict[str, list[float]] = {"kpo filter": [], "plain pyarrow": []}
    peak_mb = wall = 0.0
    for i in range(args.repeats):  # alternate the jobs so that both see the same machine load
        peak, wall, out = child_peak_mb(FILTER_JOB, *job_args)
        if i == 0:  # the peak over the children so far: the imports alone and this job
            peak_mb = peak
        times["kpo filter"].append(float(out.split()[-1]))
        out_mb = os.path.getsize(dst) / 2**20
        times["plain pyarrow"].append(float(child_peak_mb(PLAIN_JOB, *job_args)[2].split()[-1]))
    print(
        f"kpo filter peak RSS: {peak_mb:.0f} MiB (imports alone: {base_mb:.0f} MiB); "
        f"wall {wall:.1f} s; output {out_mb:.0f} MiB"
    )
    for name, seconds in times.items():
        rates = sorted(args.tokens / s for s in seconds)
        print(
            f"{name:14} {rates[-1]:.3e} tokens/s best of {len(rates)} "
            f"(worst {rates[0]:.3e}, median {statistics.median(rates):.3e})"
        )
    best = {name: min(seconds) for name, seconds in times.items()}
    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    print(
        f"kpo filter / plain pyarrow: {best['plain pyarrow'] / best['kpo filter']:.2f} of the "
        f"speed, best against best ({median['plain pyarrow'] / median['kpo filter']:.2f} median "
        "against median); target >= 0.85"
    )
    if args.writers:
        compare_writers(args.tokens, job_args, args.repeats)
    src.unlink()
    dst.unlink()
    folder.rmdir()


def compare_writers(tokens: int, job_args: tuple[str, str, str], repeats: int) -> None:
    """The plain job with each writer setting, repeated alternately: best speed, output size."""
    names = ("pyarrow default", "no dictionary", "chosen")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    sizes: dict[str, float] = {}
    for _ in range(repeats):
        for name in names:
            out = child_peak_mb(PLAIN_JOB, *job_args, name)[2]
            seconds[name].append(float(out.split()[-1]))
            sizes[name] = os.path.getsize(job_args[1]) / 2**20
    base = min(seconds["pyarrow default"])
    for name in names:
        best = min(seconds[name])
        print(
            f"writer {name:16} {tokens / best:.3e} tokens/s best of {repeats} "
            f"({base / best:.2f}x pyarrow's default), output {sizes[name]:.0f} MiB"
        )


if __name__ == "__main__":
    main()
