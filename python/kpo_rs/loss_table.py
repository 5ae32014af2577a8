"""``kpo_rs.loss_table``, kept importable: the module is :mod:`kpo_rs.losses.table`."""

from .losses.table import *  # noqa: F403
from .losses.table import __all__  # noqa: F401
