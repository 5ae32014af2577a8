"""Rollout dumps (kpo_rs.dump.RolloutDumper): shards, sampling, schema, the size bound and a full
disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from kpo_rs.dump import DUMP_METADATA_KEY, SCHEMA_VERSION, RolloutDumper  # noqa: E402


def _batch(rows=10, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, length, generator=g)
    old = lp + 0.01 * torch.randn(rows, length, generator=g)
    mask = torch.arange(length) < torch.randint(1, length + 1, (rows, 1), generator=g)
    mask[0, 2] = False  # a hole
    adv = torch.randn(rows, generator=g)
    return lp, old, mask, adv


def test_shards_every_n_steps_with_the_sampled_rows(tmp_path):
    lp, old, mask, adv = _batch()
    engine = old + 0.001
    dumper = RolloutDumper(tmp_path / "d", every=2, rows=4, rank=3)
    paths = [dumper(lp, old, mask, adv, engine_log_prob=engine) for _ in range(5)]
    assert [p is not None for p in paths] == [True, False, True, False, True]
    assert paths[2].name == "step-00000002-rank-00003.parquet"
    table = pq.read_table(paths[0])
    meta = json.loads(table.schema.metadata[DUMP_METADATA_KEY])
    assert meta["version"] == SCHEMA_VERSION and "engine_log_prob" in meta["columns"]
    rows = table.column("row").to_pylist()
    assert rows == [0, 2, 5, 7]  # floor(i * 10 / 4)
    for i, r in enumerate(rows):
        valid = mask[r].numpy()
        last = int(np.flatnonzero(valid)[-1]) + 1
        assert table.column("length")[i].as_py() == valid.sum()
        assert table.column("mask")[i].as_py() == valid[:last].tolist()
        np.testing.assert_array_equal(
            np.array(table.column("log_prob")[i].as_py(), dtype=np.float32),
            lp[r, :last].numpy(),
        )
        np.testing.assert_array_equal(
            np.array(table.column("engine_log_prob")[i].as_py(), dtype=np.float32),
            engine[r, :last].numpy(),
        )
        assert table.column("advantages")[i].as_py() == [pytest.approx(float(adv[r]))] * last
    assert set(table.column("step").to_pylist()) == {0}
    assert set(table.column("rank").to_pylist()) == {3}
    # no temporary file left behind
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        f"step-0000000{s}-rank-00003.parquet" for s in (0, 2, 4)
    ]


def test_given_steps_dump_once_per_step(tmp_path):
    lp, old, mask, adv = _batch()
    dumper = RolloutDumper(tmp_path, every=10, rows=2)
    got = [dumper(lp, old, mask, adv, step=s) for s in (0, 0, 5, 10, 10)]
    assert [g is not None for g in got] == [True, False, False, True, False]
    assert pq.read_table(got[0]).column("engine_log_prob").null_count == 2


def test_size_bound_and_unwritable_folder_stop_with_one_warning(tmp_path):
    lp, old, mask, adv = _batch(rows=64, length=256)
    dumper = RolloutDumper(tmp_path, every=1, rows=64, max_mb=0.5)
    with pytest.warns(UserWarning, match="KPO_DUMP_MAX_MB") as record:
        for _ in range(20):
            dumper(lp, old, mask, adv)
    assert len(record) == 1 and dumper.stopped and 0 < dumper.shards < 20
    assert dumper.written_bytes <= 0.5 * (1 << 20)
    blocked = tmp_path / "file"
    blocked.write_text("")
    dumper = RolloutDumper(blocked / "sub", every=1)
    with pytest.warns(UserWarning, match="cannot write") as record:
        assert dumper(lp, old, mask, adv) is None
        assert dumper(lp, old, mask, adv) is None
    assert len(record) == 1


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KPO_DUMP_DIR", raising=False)
    assert RolloutDumper.from_env() is None
    monkeypatch.setenv("KPO_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("KPO_DUMP_EVERY", "3")
    d = RolloutDumper.from_env()
    assert d is not None and d.every == 3 and d.rows == 64 and d.max_mb == 1024
    monkeypatch.setenv("KPO_DUMP_ROWS", "0")
    with pytest.raises(ValueError, match="KPO_DUMP_ROWS=0"):
        RolloutDumper.from_env()
    monkeypatch.setenv("KPO_DUMP_ROWS", "8")
    monkeypatch.setenv("KPO_DUMP_MAX_MB", "x")
    with pytest.raises(ValueError, match="KPO_DUMP_MAX_MB=x"):
        RolloutDumper.from_env()
