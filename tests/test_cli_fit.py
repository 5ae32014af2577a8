"""``kpo analyze`` leads with the filter's activity, ``--fit`` fits q and r to the file, and an
empty file is a one-line message."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from kpo_rs import cli  # noqa: E402
from kpo_rs.diagnostics import mean_data_weight  # noqa: E402

ARGS = ("--log-ratio", "lr", "--no-progress")


def _write(path, rows: int, length: int, q: float, r: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = np.cumsum(rng.normal(0, math.sqrt(q), (rows, length)), axis=1)
    z = (z + rng.normal(0, math.sqrt(r), z.shape)).astype(np.float32)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length)
    pq.write_table(pa.table({"lr": pa.ListArray.from_arrays(offsets, z.reshape(-1))}), path)
    return z


def test_analyze_leads_with_activity_and_fits(tmp_path, capsys):
    path = tmp_path / "r.parquet"
    _write(path, 64, 512, 1e-4, 0.02)
    assert cli.main(["analyze", str(path), *ARGS, "--fit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["activity"]["median_length"] == 512
    assert out["activity"]["data_weight"] == pytest.approx(mean_data_weight(512), rel=1e-12)
    assert out["activity"]["effective_window"] == pytest.approx(1000.5, rel=1e-6)
    fit = out["fit"]
    # 32k tokens: q within about 15% of the truth (its standard error is about 6%)
    assert fit["q"] == pytest.approx(1e-4, rel=0.3) and fit["r"] == pytest.approx(0.02, rel=0.05)
    assert not fit["flat"] and fit["rows_used"] == 64 and 0.0 <= fit["clipped_share"] <= 1.0
    assert cli.main(["analyze", str(path), *ARGS, "--fit"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("filter at these settings") and "nearly inert" in text
    assert "fitted on 64 rows" in text and text.index("fitted on") < text.index("diagnostic ")


def test_empty_file_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "e.parquet"
    _write(path, 0, 10, 1e-4, 0.02)
    assert cli.main(["analyze", str(path), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "no valid tokens" in err and "\n" not in err


def test_fit_refuses_the_ratio_space(tmp_path, capsys):
    path = tmp_path / "r.parquet"
    _write(path, 4, 20, 1e-4, 0.02)
    assert cli.main(["analyze", str(path), *ARGS, "--fit", "--space", "ratio"]) == 2
    assert "log_ratio" in capsys.readouterr().err


def test_filter_q_fit_records_the_fitted_settings(tmp_path, capsys):
    src, dst = tmp_path / "r.parquet", tmp_path / "o.parquet"
    z = _write(src, 32, 256, 1e-4, 0.02)
    assert cli.main(["filter", str(src), str(dst), *ARGS, "--q", "fit"]) == 0
    assert "fitted q, r" in capsys.readouterr().out
    record = json.loads(pq.read_schema(dst).metadata[b"kpo_rs.fitted_settings"])
    assert record["q"] == pytest.approx(1e-4, rel=0.4) and record["rows_used"] == 32
    # the output is the filter at the recorded settings
    import kpo_rs

    want = kpo_rs.kalman_filter(z, q=record["q"], r=record["r"], p0=record["p0"])
    got = np.array(pq.read_table(dst).column("kpo_filtered_log_ratio").to_pylist())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # float32 output
    # --fit is the one spelling in both commands; --q fit its alias (with a note)
    assert cli.main(["filter", str(src), str(tmp_path / "p.parquet"), *ARGS, "--fit"]) == 0
    capsys.readouterr()
    assert (
        pq.read_schema(tmp_path / "p.parquet").metadata[b"kpo_rs.fitted_settings"]
        == (pq.read_schema(dst).metadata[b"kpo_rs.fitted_settings"])
    )
    assert cli.main(["analyze", str(src), *ARGS, "--q", "fit", "--json"]) == 0
    captured = capsys.readouterr()
    assert "alias of --fit" in captured.err
    assert json.loads(captured.out)["fit"]["q"] == pytest.approx(record["q"], rel=1e-12)


def test_filter_fit_honours_r_and_refuses_a_number_for_q(tmp_path, capsys):
    src, dst = tmp_path / "r.parquet", tmp_path / "o.parquet"
    _write(src, 32, 256, 1e-4, 0.02)
    assert cli.main(["filter", str(src), str(dst), *ARGS, "--q", "fit", "--r", "0.5"]) == 0
    capsys.readouterr()
    record = json.loads(pq.read_schema(dst).metadata[b"kpo_rs.fitted_settings"])
    assert record["r"] == 0.5 and record["fitted"] == ["q"]
    assert cli.main(["filter", str(src), str(dst), *ARGS, "--fit", "--q", "1e-3"]) == 2
    assert "--fit fits q" in capsys.readouterr().err


def test_a_fit_on_a_few_tokens_warns(tmp_path, capsys):
    src, dst = tmp_path / "r.parquet", tmp_path / "o.parquet"
    _write(src, 1, 8, 1e-4, 0.02, seed=3)
    assert cli.main(["filter", str(src), str(dst), *ARGS, "--fit"]) == 0
    err = capsys.readouterr().err
    assert "warning: the fit used 8 tokens only" in err


def test_unknown_flag_prints_the_sub_command_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["filter", "a.parquet", "b.parquet", "--fitt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kpo filter") and "unrecognized arguments: --fitt" in err


def test_null_rows_are_counted_and_not_fitted_on(tmp_path, capsys):
    src = tmp_path / "r.parquet"
    z = _write(src, 16, 256, 1e-4, 0.02)
    z[3, 10] = np.nan
    offsets = pa.array(np.arange(17, dtype=np.int32) * 256)
    pq.write_table(pa.table({"lr": pa.ListArray.from_arrays(offsets, z.reshape(-1))}), src)
    argv = ["analyze", str(src), *ARGS, "--fit"]
    assert cli.main(argv) == 2
    assert "--on-non-finite null" in capsys.readouterr().err
    assert cli.main([*argv, "--on-non-finite", "null", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bad_rows"] == [3] and out["fit"]["rows_used"] == 15
    assert out["fit"]["tokens"] == 15 * 256
    assert cli.main([*argv, "--on-non-finite", "null"]) == 0
    assert "16 rows (1 null: 1 with non-finite values)" in capsys.readouterr().out
