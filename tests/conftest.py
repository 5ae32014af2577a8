"""Hypothesis profiles: "ci" runs 200 examples per property (chosen by scripts/test.sh when CI is
set), "dev" 50 for quick local runs (the default). Pick one with HYPOTHESIS_PROFILE."""

import os

from hypothesis import HealthCheck, settings

_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=200, **_common)
settings.register_profile("dev", max_examples=50, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
