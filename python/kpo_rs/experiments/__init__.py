"""The applications built on the library (the lab): ``kpo demo`` (:mod:`~kpo_rs.experiments.demo`,
its settings in :mod:`~kpo_rs.experiments.config`, the task it trains on behind
:class:`~kpo_rs.experiments.tasks.Task`), ``kpo sweep`` (:mod:`~kpo_rs.experiments.sweep`; its
files in :mod:`~kpo_rs.experiments.results`, its report in :mod:`~kpo_rs.experiments.report`, its
plots in :mod:`~kpo_rs.experiments.plots`) and ``kpo bench`` (:mod:`~kpo_rs.experiments.bench`).
:mod:`kpo_rs.doctor` (``kpo doctor``) is the library's, not the lab's.

Nothing in the library imports this package; its command lines live in :mod:`kpo_rs.cli`.
"""
