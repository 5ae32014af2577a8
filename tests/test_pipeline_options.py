"""``on_non_finite`` is checked once, the same way everywhere, before any file is opened; the
pipeline's error messages keep their quotes."""

from __future__ import annotations

import pytest

pa = pytest.importorskip("pyarrow")  # the arrow extra

from kpo_rs.arrow import check_on_non_finite, filter_record_batch  # noqa: E402
from kpo_rs.pipeline import (  # noqa: E402
    Columns,
    PipelineError,
    _row_error,
    analyze_parquet,
    filter_parquet,
)

MESSAGE = "on_non_finite must be 'error' or 'null', got 'nul'"


def test_check_on_non_finite():
    assert check_on_non_finite("error") == "error"
    assert check_on_non_finite("null") == "null"
    with pytest.raises(ValueError) as info:
        check_on_non_finite("nul")
    assert str(info.value) == MESSAGE


def test_filter_parquet_checks_the_option_before_the_files(tmp_path):
    dst = tmp_path / "out.parquet"
    with pytest.raises(PipelineError) as info:
        filter_parquet(tmp_path / "missing.parquet", dst, Columns("lp", "old"), on_non_finite="nul")
    assert str(info.value) == MESSAGE
    assert not dst.exists()


def test_analyze_parquet_checks_the_option_before_the_files(tmp_path):
    with pytest.raises(PipelineError) as info:
        analyze_parquet(tmp_path / "missing.parquet", Columns("lp", "old"), on_non_finite="nul")
    assert str(info.value) == MESSAGE


def test_filter_record_batch_checks_the_option():
    batch = pa.RecordBatch.from_pydict({"z": pa.array([[0.1, 0.2]], pa.list_(pa.float32()))})
    with pytest.raises(ValueError) as info:
        filter_record_batch(batch, log_ratio="z", on_non_finite="nul")
    assert str(info.value) == MESSAGE


def test_row_error_keeps_quotes():
    assert str(_row_error(ValueError("got 'x'"), "f.parquet", 0)) == "f.parquet: got 'x'"
    missing = KeyError("no column 'x'; the columns are ['a']")
    assert str(_row_error(missing, "f.parquet", 0)) == (
        "f.parquet: no column 'x'; the columns are ['a']"
    )
