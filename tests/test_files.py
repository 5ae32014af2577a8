"""Whole-or-nothing file writes (kpo_rs._files) and the writers built on them: an error (or Ctrl-C)
while writing leaves the destination byte for byte as it was and no temporary file beside it; a
finished write replaces the content."""

from __future__ import annotations

import os
import stat

import pytest

from kpo_rs import _files


class Boom(Exception):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_error_inside_leaves_the_destination_and_no_temporary_file(tmp_path, error):
    dst = tmp_path / "out.txt"
    dst.write_bytes(b"old content\n")
    with pytest.raises(error), _files.replacing(dst) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise error
    assert dst.read_bytes() == b"old content\n"
    assert _leftovers(tmp_path) == []


def test_error_inside_creates_no_destination(tmp_path):
    dst = tmp_path / "new.txt"
    with pytest.raises(Boom), _files.replacing(dst):
        raise Boom
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_the_content(tmp_path):
    dst = tmp_path / "out.txt"
    dst.write_text("old content, longer than the new\n")
    with _files.replacing(dst) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith(".out.txt.")
        with open(tmp, "w") as f:
            f.write("new\n")
    assert dst.read_text() == "new\n"
    assert _leftovers(tmp_path) == []
    _files.write_text(dst, "newer ±\n")
    assert dst.read_text() == "newer ±\n"
    assert _leftovers(tmp_path) == []


def test_permissions_kept_or_from_the_umask(tmp_path):
    dst = tmp_path / "out.txt"
    dst.write_text("old")
    os.chmod(dst, 0o640)
    _files.write_text(dst, "new")
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640
    mask = os.umask(0o027)
    try:
        _files.write_text(tmp_path / "fresh.txt", "new")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "fresh.txt").stat().st_mode) == 0o640


def test_a_link_is_followed(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    _files.write_text(link, "new")
    assert link.is_symlink()
    assert real.read_text() == "new"


def test_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(OSError), _files.replacing(tmp_path / "missing" / "out.txt"):
        pass


def test_write_results_keeps_the_old_file_on_error(tmp_path):
    from kpo_rs.experiments import results as sweep_results
    from kpo_rs.experiments.results import COLUMNS

    dst = tmp_path / "results.csv"
    sweep_results.write_results([{"loss": "grpo", "seed": 0}], dst)
    before = dst.read_bytes()
    assert before.startswith(",".join(COLUMNS).encode() + b"\r\n")

    def rows():
        yield {"loss": "kpo", "seed": 1}
        raise Boom

    with pytest.raises(Boom):
        sweep_results.write_results(rows(), dst)
    assert dst.read_bytes() == before
    assert _leftovers(tmp_path) == []
    sweep_results.write_results([{"loss": "kpo", "seed": 1}], dst)
    assert dst.read_bytes() != before
    assert b"kpo" in dst.read_bytes()


def test_demo_outputs_keep_the_old_file_on_error(tmp_path):
    pytest.importorskip("torch")
    from kpo_rs.experiments import demo

    dst = tmp_path / "metrics.csv"
    dst.write_bytes(b"old metrics\n")
    entry = demo.StepLog(**{name: 0 for name in demo.StepLog.__dataclass_fields__})
    result = {"config": None, "logs": [entry, "not a step log"]}
    with pytest.raises(TypeError):
        demo.write_outputs(result, tmp_path)
    assert dst.read_bytes() == b"old metrics\n"
    assert _leftovers(tmp_path) == []
