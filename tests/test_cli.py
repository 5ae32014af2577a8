"""The ``kpo`` command: data safety of ``kpo filter``, help, version, missing extras, output for
people and for machines."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

# Most of these run Parquet jobs (the arrow extra); without pyarrow, scripts/core_env_tests.sh
# runs the CLI itself.
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from helpers import interruptible, with_value, write_rollouts_parquet  # noqa: E402
from kpo_rs import cli  # noqa: E402
from kpo_rs.cli import _common as cli_common  # noqa: E402

KPO = os.path.join(os.path.dirname(sys.executable), "kpo")
COLS = ["--log-probs", "logp", "--old-log-probs", "old_logp"]


def _kpo(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([KPO, *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.slow
def test_ctrl_c_leaves_the_destination_unchanged_and_exits_130(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_rollouts_parquet(src, rows=3000, length=1500, row_group=256)
    dst.write_bytes(b"an earlier result")
    args = ["filter", str(src), str(dst), *COLS, "--batch-size", "32", "--log-every", "0"]
    proc = interruptible([KPO, *args], stderr=subprocess.PIPE, text=True)
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
    write_rollouts_parquet(tmp_path / "in.parquet")
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
    table = write_rollouts_parquet(src)
    pq.write_table(with_value(table, "old_logp", 37, 4, float("nan")), src, row_group_size=16)
    argv = ["filter", str(src), str(dst), *COLS, "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"kpo filter: {src}: column 'old_logp': non-finite value nan at row 37, position 4 "
        "(--on-non-finite null gives such rows null outputs and goes on)\n"
    )
    assert not dst.exists()
    assert cli.main([*argv, "--on-non-finite", "null"]) == 0
    out = capsys.readouterr().out
    assert "40 rows (1 null: 1 with non-finite values), 1950 valid tokens" in out
    assert "1 row with non-finite values at valid tokens has null outputs: row 37" in out
    assert pq.read_table(dst)["kpo_filtered_ratio"].null_count == 1


def test_filter_reads_a_list_double_mask_as_its_0_1_integers_and_refuses_others(tmp_path, capsys):
    table = write_rollouts_parquet(tmp_path / "in.parquet", rows=20, length=30)
    rng = np.random.default_rng(8)
    bits = [(rng.random(30) < 0.8) for _ in range(20)]
    outputs = []
    for name, mask in (
        ("ints", pa.array([b.astype(np.int64) for b in bits], type=pa.list_(pa.int64()))),
        ("doubles", pa.array([b.astype(np.float64) for b in bits], type=pa.list_(pa.float64()))),
    ):
        src, dst = tmp_path / f"{name}.parquet", tmp_path / f"{name}.out.parquet"
        pq.write_table(table.append_column("response_mask", mask), src)
        argv = ["filter", str(src), str(dst), *COLS, "--mask", "response_mask", "--no-progress"]
        assert cli.main(argv) == 0
        outputs.append(pq.read_table(dst)["kpo_filtered_log_ratio"])
    assert outputs[0].equals(outputs[1])
    bad = [b.astype(np.float64) for b in bits]
    bad[13][7] = 0.5
    src = tmp_path / "bad.parquet"
    pq.write_table(table.append_column("m", pa.array(bad, type=pa.list_(pa.float64()))), src)
    argv = ["filter", str(src), str(tmp_path / "o.parquet"), *COLS, "--mask", "m", "--no-progress"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"kpo filter: {src}: column 'm': mask value 0.5 is not 0 or 1 at row 13, position 7\n"
    )


# --------------------------------------------------------------------------------------------
# Help, version, missing extras, output for people and machines.


def test_kpo_alone_prints_help_and_version_works():
    import kpo_rs

    out = _kpo()
    assert out.returncode == 0 and out.stdout.startswith("usage: kpo")
    for command in ("demo", "sweep", "filter", "analyze", "bench"):
        assert f"    {command}" in out.stdout
    out = _kpo("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"kpo-rs {kpo_rs.__version__}"


def _without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """``kpo argv`` in a fresh interpreter where ``module`` cannot be imported."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from kpo_rs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("module", "argv", "extra"),
    [
        ("pyarrow", ["filter", "{d}/in.parquet", "{d}/out.parquet", *COLS], "arrow"),
        ("pyarrow", ["analyze", "{d}/in.parquet", *COLS], "arrow"),
        ("matplotlib", ["analyze", "{d}/in.parquet", "--out", "{d}/plots", *COLS], "arrow"),
        ("torch", ["demo", "--steps", "1"], "demo"),
        ("rich", ["demo", "--steps", "1"], "demo"),
    ],
)
def test_a_missing_optional_package_names_the_extra(tmp_path, module, argv, extra):
    write_rollouts_parquet(tmp_path / "in.parquet")
    out = _without(module, *[a.format(d=tmp_path) for a in argv], "--no-progress")
    command = argv[0]
    assert out.returncode == 2, out.stderr
    assert out.stderr == (
        f"kpo {command} needs the '{extra}' extra: pip install 'kpo-rs[{extra}]' "
        f"(missing: {module})\n"
    )


def test_every_missing_package_of_the_extra_is_named():
    """Without torch and rich, ``kpo demo`` names both (the first one an import met first), so
    one install fixes it."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['rich'] = None\n"
        "from kpo_rs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "demo", "--steps", "1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert line.startswith("kpo demo needs the 'demo' extra: pip install 'kpo-rs[demo]' (missing: ")
    assert sorted(line.split("(missing: ")[1].rstrip(")").split(", ")) == ["rich", "torch"]


def test_filter_and_analyze_need_no_rich(tmp_path):
    write_rollouts_parquet(tmp_path / "in.parquet")
    out = _without(
        "rich", "filter", str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"), *COLS
    )
    assert out.returncode == 0 and "40 rows" in out.stdout, out.stderr
    out = _without("rich", "analyze", str(tmp_path / "in.parquet"), *COLS)
    assert out.returncode == 0 and "switch frequency" in out.stdout, out.stderr


def test_sweep_is_imported_only_for_kpo_sweep():
    code = (
        "import sys\nfrom kpo_rs import cli\ncli.build_parser('filter')\n"
        "print('kpo_rs.experiments.sweep' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    out = _kpo("sweep", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: kpo sweep")
    out = _without("kpo_rs.experiments.sweep", "sweep")
    assert out.returncode == 2 and out.stderr.startswith("kpo sweep: not available"), out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_analyze_json_and_counts_agree_with_filter(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 200, 60)
    lp = [(-rng.random(n)).astype(np.float32) for n in lengths]
    mask = [(rng.random(n) < 0.8).astype(np.int8) for n in lengths]  # verl's 0/1 response_mask
    table = pa.table(
        {
            "logp": pa.array(
                [None if i % 9 == 4 else v for i, v in enumerate(lp)], type=pa.list_(pa.float32())
            ),
            "old_logp": pa.array(
                [v - rng.normal(0, 0.1, v.size).astype(np.float32) for v in lp],
                type=pa.list_(pa.float32()),
            ),
            "response_mask": pa.array(mask, type=pa.list_(pa.int8())),
        }
    )
    pq.write_table(table, src)
    common = [*COLS, "--mask", "response_mask", "--no-progress"]
    assert cli.main(["analyze", str(src), "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    nulls = sum(i % 9 == 4 for i in range(60))
    valid = sum(int(m.sum()) for i, m in enumerate(mask) if i % 9 != 4)
    assert (result["rows"], result["null_rows"], result["tokens"]) == (60, nulls, valid)
    assert result["bad_rows"] == [] and 0.4 < result["raw"]["switch_frequency"] < 0.6
    assert cli_common.jsonable({"a": [math.nan, 1.0, math.inf]}) == {"a": [None, 1.0, None]}
    assert cli.main(["filter", str(src), str(tmp_path / "out.parquet"), *common]) == 0
    assert f"60 rows ({nulls} null), {valid} valid tokens" in capsys.readouterr().out


def test_analyze_without_a_terminal_draws_no_boxes(tmp_path, capsys):
    write_rollouts_parquet(tmp_path / "in.parquet")
    assert cli.main(["analyze", str(tmp_path / "in.parquet"), *COLS, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "switch frequency" in out and "40 rows (0 null), 2000 valid tokens" in out
    assert out.isascii(), out  # no box-drawing characters


def test_progress_lines_in_logs_when_stderr_is_not_a_terminal(tmp_path, capsys):
    write_rollouts_parquet(tmp_path / "in.parquet")
    argv = ["filter", str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"), *COLS]
    assert cli.main([*argv, "--batch-size", "16", "--log-every", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == [
        "kpo filter: 16/40 rows (40%)",
        "kpo filter: 32/40 rows (80%)",
        "kpo filter: 40/40 rows (100%)",
    ]
    assert cli.main([*argv, "--batch-size", "16"]) == 0  # every 10 s by default: none here
    assert capsys.readouterr().err == ""
    assert cli.main([*argv, "--batch-size", "16", "--log-every", "0", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_bench_takes_tokens_per_row_and_the_old_time_still_works(capsys):
    parser = cli.build_parser("bench")
    assert parser.parse_args(["bench", "--tokens-per-row", "64"]).tokens_per_row == 64
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["bench", "--time", "32"]).tokens_per_row == 32
    assert "--time is deprecated; use --tokens-per-row" in capsys.readouterr().err
    out = _kpo("bench", "--help").stdout
    assert "--tokens-per-row" in out and "--time" not in out


@pytest.mark.slow  # a training run (test_demo.py runs the demo through the CLI in the fast tier)
def test_demo_without_a_terminal_prints_a_plain_table_and_its_footnote(tmp_path, capsys):
    argv = ["demo", "--steps", "2", "--seeds", "1", "--losses", "grpo,kpo"]
    assert cli.main([*argv, "--response-len", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.isascii(), out  # no box-drawing characters
    table = out.splitlines()
    assert table[0].startswith("2 steps x 1 seeds") and table[1].split()[:3] == [
        "variant",
        "eval",
        "auc",
    ]
    assert [line.split()[0] for line in table[2:4]] == ["grpo", "kpo"]
    text = " ".join(table)
    assert "collapses: times the eval reward stayed" in text  # the columns are defined
    assert "not a held-out set" in text  # the evaluation says what it is
    assert "data weight: kpo_data_weight" in text


def test_bad_settings_and_plot_folders_are_one_line(tmp_path, capsys):
    write_rollouts_parquet(tmp_path / "in.parquet")
    (tmp_path / "a_file").write_text("")
    src, dst = str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")
    assert cli.main(["filter", src, dst, *COLS, "--q", "-1", "--log-every", "0"]) == 2
    assert capsys.readouterr().err == "kpo filter: --q must be a number >= 0, got -1.0\n"
    assert cli.main(["analyze", src, *COLS, "--r", "0", "--log-every", "0"]) == 2
    assert capsys.readouterr().err.startswith("kpo analyze: --r must be a finite number > 0")
    plots = str(tmp_path / "a_file" / "plots")
    assert cli.main(["analyze", src, *COLS, "--out", plots, "--log-every", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kpo analyze: cannot create the plot folder {plots}")
    assert len(err.splitlines()) == 1


def test_help_needs_no_optional_package():
    for module in ("rich", "pyarrow", "torch", "matplotlib"):
        out = _without(module)
        assert out.returncode == 0 and out.stdout.startswith("usage: kpo"), out.stderr


def test_filter_frictions_are_one_line(tmp_path, capsys):
    """A non-Parquet OUT name and two ratio sources are each refused in one line saying what is
    wrong; ``kpo bench --dtype`` has help text."""
    write_rollouts_parquet(tmp_path / "in.parquet")
    src = str(tmp_path / "in.parquet")
    assert cli.main(["filter", src, str(tmp_path / "out.csv"), *COLS, "--log-every", "0"]) == 2
    assert capsys.readouterr().err == (
        "kpo filter: OUT must be a Parquet file name (.parquet or .pq), "
        f"got {tmp_path / 'out.csv'}\n"
    )
    assert not (tmp_path / "out.csv").exists()
    argv = ["filter", src, str(tmp_path / "o.parquet"), *COLS, "--ratio", "x", "--log-every", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err == "kpo filter: give only one source of ratios, "
        "got --log-probs/--old-log-probs and --ratio\n"
    )
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "float width of the benchmarked values" in capsys.readouterr().out
