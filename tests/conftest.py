"""Hypothesis profiles and the test tiers.

Profiles (pick one with HYPOTHESIS_PROFILE): "fast" runs 20 examples per property (the default:
the quick loop), "dev" 50, "ci" 200 (chosen by scripts/test.sh when CI is set).

Tiers are pytest markers registered in pyproject.toml: ``slow`` (over about a second each; left
out of a plain ``pytest`` run by its ``-m "not slow"`` default, run with ``pytest -m ""``),
``integration`` (needs an optional stack: verl, TRL, Ray; skipped when it is missing) and ``gpu``
(needs a CUDA device; skipped without one). tests/README.md says what runs where. The helpers the
test modules share are in ``helpers.py``.

With ``KPO_TESTS_WITHOUT_STACKS=1`` (set by scripts/core_env_tests.sh, which runs the tests where
no optional stack is installed) an ``integration`` test that passes is reported as failed: there,
every one must skip for want of its package.
"""

import os

# The tests' models and tensors are tiny: one intra-op thread each (torch reads this when it is
# imported, and worker processes inherit it). With the default, one per core, OpenMP's waiting
# threads made a small demo run about 10x slower on this 2-core machine whenever other work was
# running (layer norms of a few hundred values taking milliseconds). The Rust core's own thread
# count (Rayon, the `threads=` argument) does not read this variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import HealthCheck, settings

_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=200, **_common)
settings.register_profile("dev", max_examples=50, **_common)
settings.register_profile("fast", max_examples=20, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under ``KPO_TESTS_WITHOUT_STACKS=1``, an ``integration`` test that passes is reported as
    failed: where no optional stack is installed it must have skipped (by ``requires``, or by
    ``pytest.skip`` / ``importorskip`` in its body)."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("KPO_TESTS_WITHOUT_STACKS") == "1"
        and report.when == "call"
        and report.passed
        and item.get_closest_marker("integration")
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is an integration test but passed without the optional stacks "
            "(KPO_TESTS_WITHOUT_STACKS=1): it must skip when its package is missing"
        )
