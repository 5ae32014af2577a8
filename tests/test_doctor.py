"""``kpo doctor`` on this machine's CPU: triton under its interpreter (small shapes, many tiles),
every backend within the tests' error bound, the JSON report and the text summary."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kpo_rs import doctor
from kpo_rs.cli import main

pytest.importorskip("torch")


def test_doctor_json_checks_every_backend_on_the_cpu(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["doctor", "--json", "--small"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "cpu" in report["devices"] and report["ok"] is True
    on_cpu = {b["backend"]: b for b in report["backends"] if b["device"] == "cpu"}
    assert set(on_cpu) == {"rust", "scan", "scan_doubling", "triton"}
    for entry in on_cpu.values():
        assert entry["available"] and 0.0 <= entry["worst"] <= 1.0
        # 2 layouts x 2 dtypes x 2 mask modes, each forward and adjoint
        assert len(entry["cases"]) == 8
        assert {c["dtype"] for c in entry["cases"]} == {"float32", "float64"}
        assert all(rate > 0 for rate in entry["timing"].values())
    assert report["verdict"].startswith("OK: ")
    assert report["auto"] == {"cpu": "rust"}


def test_doctor_cases_span_many_triton_tiles():
    """The small cases cut into the CPU's 16-token tiles: every row but the empty and one-token
    ones spans several, and the packed rows are uneven."""
    padded, packed = doctor.cases(small=True)
    assert padded["values"].shape[1] >= 5 * 16
    lengths = sorted(int(n) for n in (packed["cu"][1:] - packed["cu"][:-1]))
    assert lengths[:2] == [0, 1] and lengths[-1] >= 6 * 16 and len(set(lengths)) >= 4
    assert not padded["mask"][1, :48].any()  # the long hole at a row start


def test_doctor_summary_names_missing_backends_and_failures():
    report = {
        "devices": ["cpu"],
        "backends": [
            {"backend": "triton", "device": "cpu", "available": False, "why": "no interpreter"},
            {
                "backend": "scan",
                "device": "cpu",
                "available": True,
                "worst": 2.5,
                "timing": {"backend": 2e6, "authors": 1e6, "copy": 4e6},
            },
        ],
        "ok": False,
        "verdict": "FAIL: scan on cpu outside the error bound",
    }
    text = doctor.summary(report).splitlines()  # (no "auto" entry: no line for it)
    assert "triton on cpu: not available (no interpreter)" in text[1]
    assert "worst error 2.5 of the bound" in text[2] and "2.00 x the authors' form" in text[2]
    assert "0.50 x a copy" in text[2] and text[-1] == report["verdict"]


def test_doctor_judges_each_backend_by_its_registered_bound(monkeypatch):
    """The row length doctor gives the tolerance is the one the backend registered (the scan's
    longer one for the scan, the row length for the Rust core): the bound the tests use."""
    import torch

    from kpo_rs import backends, testing

    seen: list[int] = []
    bound = testing.tolerance

    def tolerance(envelope, dtype, row_length):
        seen.append(row_length)
        return bound(envelope, dtype, row_length)

    monkeypatch.setattr(doctor.testing, "tolerance", tolerance)
    longest = [c["values"].shape[-1] if c["cu"] is None else int(np.diff(c["cu"]).max())
               for c in doctor.cases(small=True)]  # fmt: skip
    for name in ("scan", "rust"):
        seen.clear()
        doctor.check_backend(name, torch.device("cpu"), small=True)
        want = {backends.get(name).error_steps(n) for n in longest}
        assert set(seen) == want
    assert backends.get("scan").error_steps(96) > 96 == backends.get("rust").error_steps(96)


@pytest.mark.slow  # a fresh interpreter importing torch: about 7 s
def test_doctor_runs_without_hypothesis():
    """After installing only an extra without hypothesis (``demo``), kpo doctor's checks import
    (the tolerances need only numpy); the strategies say which extra they need, in one line."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "from kpo_rs import doctor\n"
        "from kpo_rs import testing\n"
        "print(doctor.summary({'devices': ['cpu'], 'backends': [], 'verdict': 'OK'}))\n"
        "try:\n"
        "    testing.padded_batches\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "OK" in out
    assert "kpo_rs.testing.padded_batches needs the 'hypothesis' package" in out
    assert "pip install 'kpo-rs[testing]'" in out
