"""KPOConfig's clip settings are read as the filter's settings are: any real number, numpy's
included; booleans and complex numbers are refused with the field's name."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("trl")

from kpo_rs.integrations.trl import KPOConfig

pytestmark = pytest.mark.integration


def _config(tmp_path, **kw):
    return KPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_numpy_reals_are_accepted(tmp_path):
    args = _config(tmp_path, kpo_epsilon_low=np.float32(0.25), kpo_epsilon_high=np.int64(1))
    assert args.kpo_epsilon_low == pytest.approx(0.25)


@pytest.mark.parametrize("value", [True, 0.1 + 0j, np.complex64(0.1)])
def test_other_values_are_refused(tmp_path, value):
    with pytest.raises(TypeError, match="kpo_epsilon_low must be a real number"):
        _config(tmp_path, kpo_epsilon_low=value)
