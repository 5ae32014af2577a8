"""``kpo_rs.peers``, kept importable: the module is :mod:`kpo_rs.losses.peers`."""

from .losses.peers import *  # noqa: F403
from .losses.peers import __all__  # noqa: F401
