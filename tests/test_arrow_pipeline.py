"""Arrow interop, the Parquet jobs behind `kpo filter` / `kpo analyze`, and Ray Data."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")  # the arrow extra
pq = pytest.importorskip("pyarrow.parquet")

import kpo_rs  # noqa: E402
from helpers import requires, with_value, write_rollouts_parquet  # noqa: E402
from kpo_rs import arrow, cli  # noqa: E402
from kpo_rs.pipeline import Columns, PipelineError, analyze_parquet, filter_parquet  # noqa: E402
from kpo_rs.space import LOG_RATIO_CLAMP  # noqa: E402

KW = {"q": 1e-3, "p0": math.inf}


def _rollouts(n_rows: int, seed: int = 0, max_len: int = 300, dtype=np.float32, nulls: bool = True):
    """A table of rollouts: empty lists, null rows, one long list, log-probs and a mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, n_rows)
    lengths[::7] = 0
    if n_rows > 3:
        lengths[3] = 5000
    old = [(-rng.random(n) * 3).astype(dtype) for n in lengths]
    new = [(o + rng.normal(0, 0.2, o.size)).astype(dtype) for o in old]
    mask = [rng.random(n) < 0.9 for n in lengths]
    list_type = pa.list_(pa.from_numpy_dtype(dtype))
    lp = pa.array([None if nulls and i % 11 == 5 else v for i, v in enumerate(new)], type=list_type)
    return pa.table(
        {
            "id": np.arange(n_rows),
            "logp": lp,
            "old_logp": pa.array(old, type=list_type),
            "mask": pa.array(mask, type=pa.list_(pa.bool_())),
        }
    )


def _expected(table: pa.Table, **kw):
    """The numpy API on the same data, row by row: filtered log-ratio lists (None for null rows),
    computed in the dtype of the log-prob columns, as the pipeline and the training loss do."""
    dtype = table.column("logp").type.value_type.to_pandas_dtype()
    out = []
    for lp, old, m in zip(
        table.column("logp").to_pylist(),
        table.column("old_logp").to_pylist(),
        table.column("mask").to_pylist(),
    ):
        if lp is None:
            out.append(None)
            continue
        z = np.asarray(lp, dtype=dtype) - np.asarray(old, dtype=dtype)
        cu = np.array([0, z.size], dtype=np.int64)
        out.append(
            kpo_rs.kalman_filter_packed(
                np.where(m, z, dtype(0)), cu, np.asarray(m, dtype=bool), **kw
            )
        )
    return out


def test_filter_list_array_keeps_offsets_nulls_and_type():
    arr = pa.array([[0.1, 0.2, None, 0.4], [], None, [0.5]], type=pa.list_(pa.float32()))
    out = arrow.filter_list_array(arr, **KW)
    assert (
        out.type == arr.type
        and out.null_count == 1
        and out.is_null().to_pylist() == [False, False, True, False]
    )
    assert [len(x) if x is not None else None for x in out.to_pylist()] == [4, 0, None, 1]
    want = kpo_rs.kalman_filter_packed(
        np.array([0.1, 0.2, 0.0, 0.4], np.float32),
        np.array([0, 4]),
        np.array([True, True, False, True]),
        **KW,
    )
    np.testing.assert_array_equal(np.array(out[0].as_py(), dtype=np.float32), want)
    # large lists, slices (offsets not starting at 0) and chunked arrays
    large = pa.array([[1.0, 2.0], [3.0, 4.0, 5.0], [6.0]], type=pa.large_list(pa.float64()))
    sliced = arrow.filter_list_array(large.slice(1, 2), **KW)
    assert sliced.type == large.type
    np.testing.assert_allclose(sliced[0].as_py(), kpo_rs.kalman_filter([[3.0, 4.0, 5.0]], **KW)[0])
    chunked = pa.chunked_array([arr, arr.slice(1)])
    out = arrow.filter_list_array(chunked, **KW)
    assert isinstance(out, pa.ChunkedArray) and out.num_chunks == 2 and len(out) == 7


def test_values_are_read_without_a_copy():
    arr = pa.array([[0.1, 0.2], [0.3]], type=pa.list_(pa.float64()))
    values, cu, valid = arrow.packed_view(arr)
    assert valid is None and cu.tolist() == [0, 2, 3]
    assert values.ctypes.data == arr.values.buffers()[1].address


def test_filter_record_batch_matches_the_numpy_api():
    table = _rollouts(60)
    out = arrow.filter_record_batch(
        table, log_probs="logp", old_log_probs="old_logp", mask="mask", **KW
    )
    assert isinstance(out, pa.Table) and out.num_columns == table.num_columns + 2
    got = out.column("kpo_filtered_log_ratio").to_pylist()
    for g, w in zip(got, _expected(table, **KW)):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=0)
    assert out.schema.field("kpo_filtered_ratio").type == pa.list_(pa.float32())
    ratio = out.column("kpo_filtered_ratio").to_pylist()
    for r, g in zip(ratio, got):
        if g is not None:  # the same float32 exp of the same float32 values
            np.testing.assert_array_equal(np.float32(r), np.exp(np.float32(g)))


def test_ratio_and_log_ratio_sources_and_ratio_space():
    z = pa.array([[0.1, -0.2, 0.05]], type=pa.list_(pa.float64()))
    r = pa.array([np.exp([0.1, -0.2, 0.05])], type=pa.list_(pa.float64()))
    b1 = pa.RecordBatch.from_arrays([z], ["z"])
    b2 = pa.RecordBatch.from_arrays([r], ["r"])
    a = arrow.filter_record_batch(b1, log_ratio="z", **KW).column("kpo_filtered_log_ratio")
    b = arrow.filter_record_batch(b2, ratio="r", **KW).column("kpo_filtered_log_ratio")
    np.testing.assert_allclose(a[0].as_py(), b[0].as_py(), rtol=1e-12)
    c = arrow.filter_record_batch(b2, ratio="r", space="ratio", **KW).column("kpo_filtered_ratio")
    np.testing.assert_allclose(
        c[0].as_py(),
        kpo_rs.kalman_filter_packed(r.values.to_numpy(), np.array([0, 3]), m0=1.0, **KW),
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"log_probs": "logp"}, ValueError, "exactly one"),
        ({"log_ratio": "nope"}, KeyError, "no column"),
        ({"log_ratio": "id"}, TypeError, "list<float>"),
        ({"log_ratio": "mask"}, TypeError, "floats"),
        ({"log_ratio": "logp", "mask": "logp"}, arrow.RowError, "mask value .* is not 0 or 1"),
        ({"log_ratio": "logp", "space": "prob"}, ValueError, "space"),
    ],
)
def test_record_batch_errors(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        arrow.filter_record_batch(_rollouts(10), **kwargs)


def test_parquet_round_trip(tmp_path):
    table = _rollouts(400, seed=3)
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src, row_group_size=64)  # several row groups
    stats = filter_parquet(src, dst, Columns("logp", "old_logp", mask="mask"), batch_size=50, **KW)
    out = pq.read_table(dst)
    assert stats.rows == 400 and out.num_rows == 400
    assert out.select(table.column_names).equals(table)  # every input column unchanged
    for g, w in zip(out.column("kpo_filtered_log_ratio").to_pylist(), _expected(table, **KW)):
        assert (g is None) == (w is None)
        if w is not None:
            np.testing.assert_array_equal(np.asarray(g), w)


def test_empty_file(tmp_path):
    table = _rollouts(0)
    pq.write_table(table, tmp_path / "in.parquet")
    stats = filter_parquet(
        tmp_path / "in.parquet", tmp_path / "out.parquet", Columns(log_ratio="logp")
    )
    assert stats.rows == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == 0


@pytest.mark.slow
def test_analyze(tmp_path):
    table = _rollouts(200, seed=4, nulls=False)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50)
    result = analyze_parquet(
        tmp_path / "in.parquet", Columns("logp", "old_logp", mask="mask"), out_dir=tmp_path
    )
    assert result["rows"] == 200
    assert abs(result["raw"]["switch_frequency"] - 0.5) < 0.02
    # An EMA with gain K switches sign about arccos(1 - K) / pi of the time: 0.08 for K = 0.03.
    assert result["filtered"]["switch_frequency"] < 0.1
    assert result["filtered"]["low_frequency_energy"] > result["raw"]["low_frequency_energy"]
    assert len(result["plots"]) == 3 and all(
        open(p, "rb").read(4) == b"\x89PNG" for p in result["plots"]
    )


@pytest.mark.slow
def test_cli_filter_and_analyze(tmp_path, capsys):
    pq.write_table(_rollouts(50, seed=5), tmp_path / "in.parquet")
    args = ["--log-probs", "logp", "--old-log-probs", "old_logp", "--mask", "mask", "--no-progress"]
    assert (
        cli.main(["filter", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), *args])
        == 0
    )
    assert "tokens/s" in capsys.readouterr().out
    assert (
        cli.main(["analyze", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "plots"), *args])
        == 0
    )
    assert "switch frequency" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["filter", "{d}/missing.parquet", "{d}/o.parquet", "--log-ratio", "x"], "cannot read"),
        (["filter", "{d}/in.parquet", "{d}/o.parquet", "--log-ratio", "nope"], "no column 'nope'"),
        (
            ["filter", "{d}/in.parquet", "{d}/o.parquet", "--log-ratio", "id"],
            "must be a list<float>",
        ),
        (["filter", "{d}/in.parquet", "{d}/o.parquet", "--log-probs", "logp"], "--old-log-probs"),
        (["analyze", "{d}/in.parquet", "--ratio", "mask"], "must hold floats"),
        (["filter", "{d}/notparquet.txt", "{d}/o.parquet", "--log-ratio", "x"], "cannot read"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, argv, words, capsys):
    pq.write_table(_rollouts(5), tmp_path / "in.parquet")
    (tmp_path / "notparquet.txt").write_text("hello")
    code = cli.main([a.format(d=tmp_path) for a in argv] + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err


def test_kpo_command_is_installed(tmp_path):
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "kpo"), "filter", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--log-probs" in out.stdout


@pytest.mark.slow
def test_memory_stays_bounded_on_a_large_file(tmp_path):
    """4 million tokens (32 MB of float32 log-probs) in 64 row groups: filtering in batches of
    2,000 rows keeps the peak RSS growth under 150 MB, far below what holding the file would take.
    (benches/pipeline_memory.py measures it on 50 million tokens.)"""
    script = tmp_path / "measure.py"
    script.write_text(
        "import resource, sys\n"
        "from kpo_rs.pipeline import Columns, filter_parquet\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "filter_parquet(sys.argv[1], sys.argv[2], Columns('logp', 'old_logp'), batch_size=2000)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    write_rollouts_parquet(tmp_path / "big.parquet", rows=8000, length=500, seed=6, row_group=125)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "big.parquet"), str(tmp_path / "out.parquet")],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 150, growth_mb


@requires("ray")
@pytest.mark.slow
def test_ray_data_map_batches_equals_single_process(tmp_path):
    """The record-batch function as a Ray Data step over a folder of Parquet files, on a local
    Ray instance, gives the single-process result."""
    import ray

    folder = tmp_path / "rollouts"
    folder.mkdir()
    tables = []
    for i in range(3):
        t = _rollouts(40, seed=10 + i)
        t = t.set_column(0, "id", pa.array(np.arange(40) + 100 * i))
        tables.append(t)
        pq.write_table(t, folder / f"part-{i}.parquet")
    step = {"log_probs": "logp", "old_log_probs": "old_logp", "mask": "mask", **KW}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_parquet(str(folder)).map_batches(
            arrow.filter_record_batch, batch_format="pyarrow", fn_kwargs=step
        )
        result = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    finally:
        ray.shutdown()
    single = pa.concat_tables([arrow.filter_record_batch(t, **step) for t in tables])

    def by_id(t: pa.Table) -> dict:
        return dict(zip(t.column("id").to_pylist(), t.column("kpo_filtered_log_ratio").to_pylist()))

    assert result.num_rows == single.num_rows == 120
    for name in ("kpo_filtered_log_ratio", "kpo_filtered_ratio"):  # float32 in, float32 out
        assert result.schema.field(name).type.value_type == pa.float32()
    assert by_id(result) == by_id(single)


# --------------------------------------------------------------------------------------------
# Data safety: the input is never overwritten, the output is all or nothing, errors name the
# file's row and the column.


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "relative path"])
def test_refuses_to_write_over_its_input(tmp_path, how, monkeypatch):
    src = tmp_path / "in.parquet"
    write_rollouts_parquet(src, seed=20, ids=True)
    before = src.read_bytes()
    dst = src
    if how == "symlink":
        dst = tmp_path / "link.parquet"
        dst.symlink_to(src)
    elif how == "hard link":
        dst = tmp_path / "hard.parquet"
        os.link(src, dst)
    elif how == "relative path":
        monkeypatch.chdir(tmp_path)
        dst = "./in.parquet"
    with pytest.raises(PipelineError, match="is the input file"):
        filter_parquet(src, dst, Columns("logp", "old_logp"))
    assert src.read_bytes() == before
    assert not [n for n in _listing(tmp_path) if n.endswith(".tmp")]


def test_a_failed_run_leaves_the_destination_as_it_was(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    table = write_rollouts_parquet(src, seed=20, ids=True)
    pq.write_table(with_value(table, "old_logp", 35, 2, float("nan")), src, row_group_size=16)
    dst.write_bytes(b"a good earlier result")
    with pytest.raises(PipelineError) as info:
        filter_parquet(src, dst, Columns("logp", "old_logp"), batch_size=8)
    # row 35 of the file (in the third row group, fourth batch), not row 3 of its batch
    message = str(info.value)
    assert "column 'old_logp'" in message and "row 35, position 2" in message, message
    assert "nan" in message and len(message.splitlines()) == 1
    assert dst.read_bytes() == b"a good earlier result"
    assert _listing(tmp_path) == ["in.parquet", "out.parquet"]  # no temporary file left


def test_an_interrupted_run_leaves_the_destination_as_it_was(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_rollouts_parquet(src, seed=20, ids=True)
    dst.write_bytes(b"before")

    def interrupt(done, total):
        if done >= 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        filter_parquet(src, dst, Columns("logp", "old_logp"), batch_size=8, progress=interrupt)
    assert dst.read_bytes() == b"before"
    assert _listing(tmp_path) == ["in.parquet", "out.parquet"]


def test_a_successful_run_replaces_the_destination_and_keeps_its_mode(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    table = write_rollouts_parquet(src, seed=20, ids=True)
    dst.write_bytes(b"old")
    os.chmod(dst, 0o640)
    filter_parquet(src, dst, Columns("logp", "old_logp"))
    assert pq.read_table(dst).num_rows == table.num_rows
    assert dst.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.parquet"
    filter_parquet(src, fresh, Columns("logp", "old_logp"))
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it
    # through a symbolic link the link's target is replaced, the link stays
    link = tmp_path / "link.parquet"
    link.symlink_to(dst)
    filter_parquet(src, link, Columns("logp", "old_logp"))
    assert link.is_symlink() and pq.read_table(dst).num_rows == table.num_rows


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing input", "cannot read {d}/nope.parquet: no such file"),
        ("missing folder", "the output folder {d}/no/such does not exist"),
        ("folder as output", "is a folder"),
        ("unwritable folder", "cannot write to the output folder {d}"),
    ],
)
def test_unusable_paths_are_named(tmp_path, case, words, monkeypatch):
    src = tmp_path / "in.parquet"
    write_rollouts_parquet(src, seed=20, ids=True)
    dst = tmp_path / "out.parquet"
    if case == "missing input":
        src = tmp_path / "nope.parquet"
    elif case == "missing folder":
        dst = tmp_path / "no" / "such" / "out.parquet"
    elif case == "folder as output":
        dst = tmp_path
    else:  # root may write anywhere, so the refusal of the system is simulated

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.mkstemp", refuse)
    calls = []
    with pytest.raises(PipelineError, match=words.format(d=tmp_path)):
        filter_parquet(src, dst, Columns("logp", "old_logp"), progress=lambda *a: calls.append(a))
    assert calls == []  # nothing reported before the paths are checked


def test_non_finite_rows_can_be_written_as_null(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    table = write_rollouts_parquet(src, seed=20, ids=True)
    table = with_value(table, "logp", 3, 0, float("inf"))
    table = with_value(table, "old_logp", 35, 49, float("-inf"))
    table = with_value(table, "old_logp", 36, 1, float("nan"))
    pq.write_table(table, src, row_group_size=16)
    stats = filter_parquet(src, dst, Columns("logp", "old_logp"), on_non_finite="null", **KW)
    assert stats.bad_rows == [3, 35, 36] and stats.rows == 40 and stats.null_rows == 0
    assert stats.tokens == 37 * 50
    out = pq.read_table(dst)
    got = out.column("kpo_filtered_log_ratio").to_pylist()
    assert [i for i, g in enumerate(got) if g is None] == [3, 35, 36]
    for name in ("logp", "old_logp"):  # the inputs are copied as they were, NaN and all
        np.testing.assert_array_equal(
            out[name].combine_chunks().values.to_numpy(),
            table[name].combine_chunks().values.to_numpy(),
        )
    clean = arrow.filter_record_batch(
        table.slice(0, 3), log_probs="logp", old_log_probs="old_logp", **KW
    )
    assert got[:3] == clean.column("kpo_filtered_log_ratio").to_pylist()[:3]
    # the same counts from kpo analyze
    result = analyze_parquet(src, Columns("logp", "old_logp"), on_non_finite="null")
    assert result["bad_rows"] == [3, 35, 36] and result["tokens"] == stats.tokens
    with pytest.raises(PipelineError, match="column 'logp': non-finite value inf at row 3"):
        analyze_parquet(src, Columns("logp", "old_logp"))


def test_filter_and_analyze_count_the_same_rows_and_tokens(tmp_path):
    src = tmp_path / "in.parquet"
    table = _rollouts(120, seed=21)  # null rows, empty rows, masked tokens
    pq.write_table(table, src, row_group_size=40)
    cols = Columns("logp", "old_logp", mask="mask")
    stats = filter_parquet(src, tmp_path / "out.parquet", cols, batch_size=25)
    result = analyze_parquet(src, cols, batch_size=25)
    nulls = sum(v is None for v in table.column("logp").to_pylist())
    valid = sum(
        sum(m) for lp, m in zip(table.column("logp").to_pylist(), table["mask"].to_pylist()) if lp
    )
    assert (stats.rows, stats.null_rows, stats.tokens) == (120, nulls, valid)
    assert (result["rows"], result["null_rows"], result["tokens"]) == (120, nulls, valid)


# --------------------------------------------------------------------------------------------
# One ratio space for the pipeline and the training loss; dtypes; masks; writer settings.


def test_ratio_space_agrees_with_the_training_loss_above_the_clamp():
    """Log-ratios above 10 (where exp is clamped) through the pipeline's filter_log_ratio and the
    KPO loss: the filtered ratios agree. Both run the same float64 filter and agree bit for bit
    on this machine; the pipeline then takes exp of a log up to 10, whose last-bit error (1.8e-15
    absolute) becomes a relative error of the ratio, and torch's exp/log may differ from numpy's
    by an ulp: rtol 1e-14 bounds both."""
    torch = pytest.importorskip("torch")
    from kpo_rs import losses

    rng = np.random.default_rng(30)
    z = rng.normal(0.0, 0.5, (3, 64))
    z[0, 5], z[1, 0], z[2, 30:34] = 12.0, 25.0, [11.0, 40.0, 10.5, 700.0]
    mask = rng.random(z.shape) < 0.85
    mask[:, 0] = mask[0, 5] = mask[2, 30:34] = True
    kw = {"q": 1e-2, "p0": math.inf, "r": 1.0}
    cu = np.arange(4, dtype=np.int64) * 64
    log_x = arrow.filter_log_ratio(z.ravel(), cu, mask.ravel(), space="ratio", **kw)
    t = torch.from_numpy
    per_token, _ = losses.kpo_token_losses(
        t(np.zeros_like(z)), t(z), -torch.ones(z.shape, dtype=torch.float64), t(mask),
        space="ratio", **kw,
    )  # fmt: skip
    # with advantages -1 and no clip, the per-token loss is the ratio the loss uses
    loss_ratio = per_token.numpy()[mask]
    pipe_ratio = np.exp(np.minimum(log_x.reshape(z.shape)[mask], LOG_RATIO_CLAMP))
    np.testing.assert_allclose(pipe_ratio, loss_ratio, rtol=1e-14, atol=0)
    # the clamp matters here: without it the filtered ratios would differ widely
    unclamped = kpo_rs.kalman_filter_packed(np.exp(z.ravel()), cu, mask.ravel(), m0=1.0, **kw)
    assert not np.allclose(unclamped.reshape(z.shape)[mask], loss_ratio, rtol=1e-3)


@pytest.mark.parametrize(
    ("types", "out"),
    [
        ((pa.float32(), pa.float32()), pa.float32()),
        ((pa.float16(), pa.float32()), pa.float32()),
        ((pa.float64(), pa.float64()), pa.float64()),
        ((pa.float32(), pa.float64()), pa.float64()),
    ],
)
def test_new_columns_keep_the_input_float_width(types, out):
    values = [[-0.5, -1.25, -0.125], [], None, [-2.0]]
    batch = pa.record_batch(
        [pa.array(values, type=pa.list_(t)) for t in types], names=["logp", "old_logp"]
    )
    got = arrow.filter_record_batch(batch, log_probs="logp", old_log_probs="old_logp")
    for name in ("kpo_filtered_log_ratio", "kpo_filtered_ratio"):
        assert got.schema.field(name).type == pa.list_(out)
    assert got.column("kpo_filtered_ratio").to_pylist()[:2] == [[1.0, 1.0, 1.0], []]


@pytest.mark.parametrize("int_type", [pa.int8(), pa.int32(), pa.int64(), pa.uint8()])
def test_masks_of_zero_one_integers_equal_bool_masks(int_type):
    table = _rollouts(30, seed=31)
    ints = pa.array(
        [None if m is None else [int(b) for b in m] for m in table["mask"].to_pylist()],
        type=pa.list_(int_type),
    )
    step = {"log_probs": "logp", "old_log_probs": "old_logp", "mask": "mask", **KW}
    want = arrow.filter_record_batch(table, **step)
    got = arrow.filter_record_batch(table.set_column(3, "mask", ints), **step)
    assert got.column("kpo_filtered_log_ratio").equals(want.column("kpo_filtered_log_ratio"))


def test_other_mask_values_are_refused_naming_row_and_position():
    lp = pa.array([[-1.0, -2.0], [-1.0, -0.5, -0.1]], type=pa.list_(pa.float32()))
    mask = pa.array([[1, 1], [1, 2, 0]], type=pa.list_(pa.int64()))
    batch = pa.record_batch([lp, mask], names=["logp", "response_mask"])
    with pytest.raises(arrow.RowError) as info:
        arrow.filter_record_batch(batch, log_ratio="logp", mask="response_mask")
    assert (
        str(info.value) == "column 'response_mask': mask value 2 is not 0 or 1 at row 1, position 1"
    )
    assert str(info.value.shifted(100)).endswith("at row 101, position 1")
    floats = pa.record_batch([lp, lp], names=["logp", "m"])
    refused = r"^column 'm': mask value -1\.0 is not 0 or 1 at row 0"
    with pytest.raises(arrow.RowError, match=refused):
        arrow.filter_record_batch(floats, log_ratio="logp", mask="m")
    strings = pa.record_batch([lp, pa.array([["a"] * 2, ["b"] * 3])], names=["logp", "m"])
    with pytest.raises(TypeError, match="m must hold bools or 0/1 numbers, got list<string>"):
        arrow.filter_record_batch(strings, log_ratio="logp", mask="m")


@pytest.mark.parametrize("float_type", [pa.float16(), pa.float32(), pa.float64()])
def test_masks_of_zero_one_floats_equal_bool_masks(float_type):
    table = _rollouts(30, seed=33)
    floats = pa.array(
        [None if m is None else [float(b) for b in m] for m in table["mask"].to_pylist()],
        type=pa.list_(float_type),
    )
    step = {"log_probs": "logp", "old_log_probs": "old_logp", "mask": "mask", **KW}
    want = arrow.filter_record_batch(table, **step)
    got = arrow.filter_record_batch(table.set_column(3, "mask", floats), **step)
    assert got.column("kpo_filtered_log_ratio").equals(want.column("kpo_filtered_log_ratio"))


@pytest.mark.parametrize("bad", [0.5, math.nan, 2.0])
def test_other_float_mask_values_are_refused_naming_row_and_position(bad):
    lp = pa.array([[-1.0, -2.0], [-1.0, -0.5, -0.1]], type=pa.list_(pa.float32()))
    mask = pa.array([[1.0, 0.0], [1.0, 1.0, bad]], type=pa.list_(pa.float64()))
    batch = pa.record_batch([lp, mask], names=["logp", "response_mask"])
    with pytest.raises(arrow.RowError) as info:
        arrow.filter_record_batch(batch, log_ratio="logp", mask="response_mask")
    assert str(info.value) == (
        f"column 'response_mask': mask value {bad} is not 0 or 1 at row 1, position 2"
    )


def test_output_is_written_with_float_suited_settings(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    table = _rollouts(50, seed=32)
    pq.write_table(table, src)
    filter_parquet(src, dst, Columns("logp", "old_logp", mask="mask"))
    meta = pq.ParquetFile(dst).metadata.row_group(0)
    chunks = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    for name in ("logp", "old_logp", "kpo_filtered_log_ratio", "kpo_filtered_ratio"):
        chunk = chunks[f"{name}.list.element"]
        assert "BYTE_STREAM_SPLIT" in chunk.encodings and "RLE_DICTIONARY" not in chunk.encodings
        assert chunk.compression == "ZSTD"
    assert "RLE_DICTIONARY" in chunks["id"].encodings  # other columns keep pyarrow's defaults


# --------------------------------------------------------------------------------------------
# Properties: the buffer-level reads and writes against pyarrow's own Python view of the data.

_rows = st.lists(
    st.one_of(
        st.none(),
        st.lists(
            st.one_of(st.none(), st.floats(-1e4, 1e4, allow_nan=False, width=16)), max_size=12
        ),
    ),
    max_size=12,
)


@given(
    rows=_rows,
    value_type=st.sampled_from([pa.float16(), pa.float32(), pa.float64()]),
    large=st.booleans(),
    cut=st.tuples(st.integers(0, 12), st.integers(0, 12)),
)
def test_packed_view_and_rebuild_match_pyarrow(rows, value_type, large, cut):
    list_type = pa.large_list(value_type) if large else pa.list_(value_type)
    arr = pa.array(rows, type=list_type)
    start = min(cut[0], len(arr))
    arr = arr.slice(start, cut[1])  # offsets and validity bits that do not start at 0
    python = arr.to_pylist()
    values, cu, valid = arrow.packed_view(arr)
    lengths = [0 if r is None else len(r) for r in python]
    assert cu.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    want_valid = [r is not None and v is not None for r in python for v in (r or [])]
    assert (np.ones(len(want_valid), bool) if valid is None else valid).tolist() == want_valid
    want = [v for r in python for v in (r or []) if v is not None]
    np.testing.assert_array_equal(values[np.array(want_valid, dtype=bool)], np.array(want))
    assert values.dtype == np.dtype(value_type.to_pandas_dtype())
    null_rows = arrow._null_rows(arr)
    back = arrow._rebuild(cu, np.where(valid, values, 0) if valid is not None else values,
                          null_rows, large)  # fmt: skip
    assert back.type == list_type
    assert [r is None for r in back.to_pylist()] == [r is None for r in python]


@given(
    rows=st.lists(
        st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(0, 1)), max_size=10)),
        max_size=10,
    ),
    int_type=st.sampled_from([pa.int8(), pa.uint8(), pa.int32(), pa.int64()]),
    start=st.integers(0, 3),
)
def test_integer_masks_read_as_bools(rows, int_type, start):
    ints = pa.array(rows, type=pa.list_(int_type)).slice(min(start, len(rows)))
    bools = pa.array(
        [None if r is None else [None if v is None else bool(v) for v in r] for r in rows],
        type=pa.list_(pa.bool_()),
    ).slice(min(start, len(rows)))
    a, b = arrow._view(ints, "m", floats=False), arrow._view(bools, "m", floats=False)
    assert a[0].dtype == b[0].dtype == np.bool_
    np.testing.assert_array_equal(a[1], b[1])
    valid = np.ones(a[0].size, bool) if a[2] is None else a[2]
    np.testing.assert_array_equal(valid, np.ones(b[0].size, bool) if b[2] is None else b[2])
    np.testing.assert_array_equal(a[0][valid], b[0][valid])


def _reference_row(lp, old, mask, dtype, space, kw):
    """One row by the numpy API, written plainly: None when the row is null or (under
    on_non_finite="null") holds a non-finite log-ratio at a valid token."""
    if lp is None or old is None or mask is None:
        return None
    valid = np.array(
        [m is True and a is not None and b is not None for m, a, b in zip(mask, lp, old)],
        dtype=bool,
    )
    # the difference of the two values rounded to the column's dtype, as the pipeline forms it
    with np.errstate(invalid="ignore"):  # inf - inf
        z = np.array(
            [dtype(a) - dtype(b) if v else 0.0 for v, a, b in zip(valid, lp, old)], dtype=dtype
        )
    if not np.isfinite(z[valid]).all():
        return None
    cu = np.array([0, z.size])
    if space == "log_ratio":
        return kpo_rs.kalman_filter_packed(z, cu, valid, m0=0.0, **kw)
    ratio = np.exp(np.minimum(z, dtype(LOG_RATIO_CLAMP)))
    return np.log(kpo_rs.kalman_filter_packed(ratio, cu, valid, m0=1.0, **kw))


_value = st.one_of(
    st.none(),
    st.floats(-20.0, 0.0, width=32),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)


@given(
    data=st.lists(
        st.tuples(
            st.one_of(st.none(), st.lists(st.tuples(_value, _value, st.booleans()), max_size=9)),
            st.booleans(),
        ),
        max_size=8,
    ),
    dtype=st.sampled_from([np.float32, np.float64]),
    space=st.sampled_from(["log_ratio", "ratio"]),
)
def test_filter_record_batch_equals_a_plain_row_loop(data, dtype, space):
    logp, old, mask = [], [], []
    for row, old_null in data:
        logp.append(None if row is None else [a for a, _, _ in row])
        old.append(None if row is None or (old_null and len(row) % 2) else [b for _, b, _ in row])
        mask.append(None if row is None else [m for _, _, m in row])
    list_type = pa.list_(pa.from_numpy_dtype(dtype))
    batch = pa.record_batch(
        [pa.array(logp, list_type), pa.array(old, list_type), pa.array(mask, pa.list_(pa.bool_()))],
        names=["logp", "old_logp", "mask"],
    )
    kw = {"q": 1e-2, "p0": math.inf, "r": 1.0}
    out = arrow.filter_record_batch(
        batch, log_probs="logp", old_log_probs="old_logp", mask="mask", space=space,
        on_non_finite="null", **kw,
    )  # fmt: skip
    got = out.column("kpo_filtered_log_ratio").to_pylist()
    for g, lp, o, m in zip(got, logp, old, mask):
        want = _reference_row(lp, o, m, dtype, space, kw)
        assert (g is None) == (want is None)
        if want is not None:
            valid = np.array([x is True and a is not None and b is not None
                              for x, a, b in zip(m, lp, o)], dtype=bool)  # fmt: skip
            np.testing.assert_array_equal(np.asarray(g, dtype=dtype)[valid], want[valid])
