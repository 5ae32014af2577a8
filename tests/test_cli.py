"""The ``kpo`` command: data safety of ``kpo filter``, help, version, missing extras, output for
people and for machines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kpo_rs import cli

KPO = os.path.join(os.path.dirname(sys.executable), "kpo")
COLS = ["--log-probs", "logp", "--old-log-probs", "old_logp"]


def _file(path, rows: int = 40, length: int = 50, seed: int = 0, row_group: int = 16) -> None:
    rng = np.random.default_rng(seed)
    old = (-rng.random(rows * length) * 3).astype(np.float32)
    new = (old + rng.normal(0, 0.2, old.size)).astype(np.float32)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length)
    table = pa.table(
        {
            "logp": pa.ListArray.from_arrays(offsets, new),
            "old_logp": pa.ListArray.from_arrays(offsets, old),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)


def _kpo(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([KPO, *args], capture_output=True, text=True, timeout=120, **kw)


def test_ctrl_c_leaves_the_destination_unchanged_and_exits_130(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    _file(src, rows=3000, length=1500, row_group=256)
    dst.write_bytes(b"an earlier result")
    args = ["filter", str(src), str(dst), *COLS, "--batch-size", "32", "--log-every", "0"]
    proc = subprocess.Popen([KPO, *args], stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # the first progress line: the job is under way
    assert "rows" in first, first
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    lines = rest.splitlines()
    assert "Traceback" not in rest
    assert lines[-1] == f"kpo filter: interrupted; {dst} was left unchanged", rest
    assert all("rows" in line for line in lines[:-1])  # nothing else: progress lines only
    assert dst.read_bytes() == b"an earlier result"
    assert sorted(os.listdir(tmp_path)) == ["in.parquet", "out.parquet"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["filter", "{d}/missing.parquet", "{d}/o.parquet"], "cannot read {d}/missing.parquet"),
        (["filter", "{d}/in.parquet", "{d}/no/o.parquet"], "output folder {d}/no does not exist"),
        (["filter", "{d}/in.parquet", "{d}/in.parquet"], "is the input file"),
        (["analyze", "{d}/missing.parquet"], "cannot read {d}/missing.parquet"),
    ],
)
def test_path_errors_are_one_line_exit_2_and_no_progress(tmp_path, argv, words):
    _file(tmp_path / "in.parquet")
    before = (tmp_path / "in.parquet").read_bytes()
    out = _kpo(*[a.format(d=tmp_path) for a in argv], *COLS, "--log-every", "0")
    assert out.returncode == 2 and out.stdout == ""
    assert (
        out.stderr.strip().splitlines() == [out.stderr.strip()]
        and words.format(d=tmp_path) in out.stderr
    ), out.stderr
    assert (tmp_path / "in.parquet").read_bytes() == before


def test_non_finite_rows_stop_the_run_or_are_listed(tmp_path, capsys):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    _file(src)
    table = pq.read_table(src)
    lists = table["old_logp"].to_pylist()
    lists[37][4] = float("nan")
    table = table.set_column(1, "old_logp", pa.array(lists, type=pa.list_(pa.float32())))
    pq.write_table(table, src, row_group_size=16)
    argv = ["filter", str(src), str(dst), *COLS, "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"kpo filter: {src}: column 'old_logp': non-finite value nan at row 37, position 4\n"
    )
    assert not dst.exists()
    assert cli.main([*argv, "--on-non-finite", "null"]) == 0
    out = capsys.readouterr().out
    assert "40 rows (0 null), 1950 valid tokens" in out
    assert "1 row with non-finite values at valid tokens has null outputs: row 37" in out
    assert pq.read_table(dst)["kpo_filtered_ratio"].null_count == 1
