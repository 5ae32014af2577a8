"""Peak memory and throughput of `kpo filter` on a large Parquet file of rollouts.

Writes a file of --tokens tokens (float32 log-probs and old log-probs, responses of 200 to 4000
tokens, row groups of 256 responses) without holding it in memory, then runs `kpo filter` on it
in a child process and reports the child's peak RSS next to the peak RSS of a child that only
imports the same modules (the baseline), and the throughput in tokens per second.

Run: python benches/pipeline_memory.py [--tokens 50000000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
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


def child_peak_mb(code: str, *args: str) -> tuple[float, float]:
    """Runs ``code`` in a fresh interpreter; returns (its peak RSS in MB, seconds)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True)
    seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    src, dst = folder / "rollouts.parquet", folder / "filtered.parquet"
    rows = write_file(src, args.tokens)
    size_mb = os.path.getsize(src) / 2**20
    imports = "import kpo_rs, kpo_rs.pipeline, pyarrow.parquet"
    base_mb, _ = child_peak_mb(imports)
    job = (
        imports + "\nimport sys\nfrom kpo_rs.pipeline import Columns, filter_parquet\n"
        "cols = Columns('logp', 'old_logp')\n"
        "s = filter_parquet(sys.argv[1], sys.argv[2], cols, batch_size=int(sys.argv[3]))\n"
        "print(f'filter_parquet: {s.tokens} tokens in {s.seconds:.1f} s = '\n"
        "      f'{s.tokens_per_second:.3e} tokens/s')"
    )
    peak_mb, seconds = child_peak_mb(job, str(src), str(dst), str(args.batch_size))
    print(f"file: {rows} responses, {args.tokens} tokens, {size_mb:.0f} MiB on disk")
    print(f"peak RSS: {peak_mb:.0f} MiB (imports alone: {base_mb:.0f} MiB); wall {seconds:.1f} s")
    src.unlink()
    dst.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
