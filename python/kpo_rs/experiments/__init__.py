"""The applications built on the library: ``kpo demo`` (:mod:`~kpo_rs.experiments.demo`, its
settings in :mod:`~kpo_rs.experiments.config`), ``kpo sweep`` (:mod:`~kpo_rs.experiments.sweep`,
its report in :mod:`~kpo_rs.experiments.report`) and ``kpo bench``
(:mod:`~kpo_rs.experiments.bench`).

Nothing in the library imports this package; its command lines live in :mod:`kpo_rs.cli`.
"""
