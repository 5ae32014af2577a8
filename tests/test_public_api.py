"""The public API, module by module: each public module's ``__all__`` against a snapshot.

A change to the public surface (a name added, renamed or removed) fails here until the snapshot
below is updated in the same commit, so that it is a decision written in the diff and the
CHANGELOG, not an accident of a refactor. The modules are the import paths users and configs name
(docs/design.md, "Map of the code"); private modules (a leading underscore) are not listed.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from test_structure import PACKAGE, _module_name

#: Modules that need an optional package, and that package.
NEEDS = {
    "kpo_rs.integrations.verl": "verl",
    "kpo_rs.integrations.trl": "trl",
    "kpo_rs.arrow": "pyarrow",
    "kpo_rs.pipeline": "pyarrow",
}

SNAPSHOT: dict[str, tuple[str, ...]] = {
    "kpo_rs": (
        "FilterOverrides",
        "FilterParams",
        "Masked",
        "Overrides",
        "__version__",
        "gains",
        "kalman_filter",
        "kalman_filter_adjoint",
        "kalman_filter_packed",
        "kalman_filter_packed_adjoint",
        "resolve_params",
    ),
    "kpo_rs.params": (
        "FilterOverrides",
        "FilterParams",
        "Masked",
        "Overrides",
        "real_setting",
        "resolve_params",
    ),
    "kpo_rs.space": (
        "LOG_RATIO_CLAMP",
        "SPACES",
        "check_space",
        "prior_mean",
        "to_filter_space",
    ),
    "kpo_rs.reference": (
        "filter_matrix",
        "gains",
        "kalman_filter",
        "kalman_filter_adjoint",
        "kalman_filter_packed",
        "kalman_filter_packed_adjoint",
    ),
    "kpo_rs.testing": (
        "PackedBatch",
        "PaddedBatch",
        "adjoint_envelope",
        "assert_filter_close",
        "filter_params",
        "forward_envelope",
        "packed_batches",
        "padded_batches",
        "tolerance",
    ),
    "kpo_rs.diagnostics": (
        "Switches",
        "low_frequency_energy",
        "low_frequency_energy_packed",
        "plot_spectra",
        "plot_switch_histogram",
        "plot_traces",
        "run_lengths",
        "run_lengths_packed",
        "token_switches",
        "token_switches_packed",
        "welch_spectrum",
    ),
    "kpo_rs.torch_ops": (
        "BACKENDS",
        "CHECKS",
        "FilterOptions",
        "check_finite",
        "kalman_filter",
        "kalman_filter_packed",
    ),
    "kpo_rs.backends": (
        "BACKENDS",
        "NAMES",
        "Rows",
        "load",
        "loaded",
        "resolve",
    ),
    "kpo_rs.losses": (
        "GRADS",
        "KPO_CLIP",
        "LOSS_AGG_MODES",
        "agg_loss",
        "gmpo_loss",
        "gspo_loss",
        "kpo_clipped_loss",
        "kpo_loss",
        "kpo_token_losses",
        "ppo_clip_loss",
        "switch_rate",
    ),
    "kpo_rs.losses.kpo": (
        "GRADS",
        "KPO_CLIP",
        "kpo_clipped_loss",
        "kpo_loss",
        "kpo_token_losses",
    ),
    "kpo_rs.losses.baselines": (
        "gmpo_loss",
        "gspo_loss",
        "ppo_clip_loss",
    ),
    "kpo_rs.losses.peers": (
        "BAPO_LOWER",
        "BAPO_STEP",
        "BAPO_TARGET",
        "BAPO_UPPER",
        "DPPO_CLIP",
        "MINPRO_CLIP",
        "bapo_candidates",
        "bapo_loss",
        "bapo_reference",
        "dppo_loss",
        "minpro_loss",
        "minpro_prefix_log_min",
        "minpro_reference",
    ),
    "kpo_rs.losses.table": (
        "LOSSES",
        "LOSS_NAMES",
        "LossSpec",
        "check_names",
        "get_loss",
    ),
    "kpo_rs.peers": (
        "BAPO_LOWER",
        "BAPO_STEP",
        "BAPO_TARGET",
        "BAPO_UPPER",
        "DPPO_CLIP",
        "MINPRO_CLIP",
        "bapo_candidates",
        "bapo_loss",
        "bapo_reference",
        "dppo_loss",
        "minpro_loss",
        "minpro_prefix_log_min",
        "minpro_reference",
    ),
    "kpo_rs.loss_table": (
        "LOSSES",
        "LOSS_NAMES",
        "LossSpec",
        "check_names",
        "get_loss",
    ),
    "kpo_rs.arrow": (
        "ON_NON_FINITE",
        "RowError",
        "check_on_non_finite",
        "filter_list_array",
        "filter_log_ratio",
        "filter_record_batch",
        "log_ratio_view",
        "packed_view",
    ),
    "kpo_rs.pipeline": (
        "Columns",
        "FilterStats",
        "PipelineError",
        "analyze_parquet",
        "filter_parquet",
        "writer_options",
    ),
    "kpo_rs.integrations.verl": (
        "ENV_VARS",
        "FORK_FIELDS",
        "IDLE_CLIP_FRACTION",
        "KPOFSDPActorConfig",
        "KPOMcoreActorConfig",
        "LOSS_MODES",
        "PPO_SCALE_CLIP",
        "check_bypass_mode",
        "compute_policy_loss_bapo",
        "compute_policy_loss_kpo",
        "compute_policy_loss_kpo_clipped",
        "compute_policy_loss_minpro",
        "configure",
        "env_settings",
        "settings",
    ),
    "kpo_rs.integrations.skyrl": (
        "ENV_VARS",
        "LOSS_NAMES",
        "bapo_policy_loss",
        "kpo_clipped_policy_loss",
        "kpo_policy_loss",
        "minpro_policy_loss",
        "policy_loss",
        "register",
    ),
    "kpo_rs.integrations.trl": (
        "KPOConfig",
        "KPOTrainer",
        "SUPPORTED_LOSS_NAMES",
        "SUPPORTED_LOSS_TYPES",
    ),
    "kpo_rs.experiments.demo": (
        "DEFAULT_LOSSES",
        "DemoConfig",
        "Run",
        "StepLog",
        "TinyPolicy",
        "run_demo",
        "summarize",
        "summary_rows",
        "table_footnote",
        "train",
        "write_outputs",
    ),
    "kpo_rs.experiments.config": (
        "DEFAULT_LOSSES",
        "DemoConfig",
        "split_names",
    ),
    "kpo_rs.experiments.sweep": (
        "PRESETS",
        "SweepConfig",
        "Task",
        "plan",
        "run_sweep",
        "run_task",
    ),
    "kpo_rs.experiments.report": (
        "COLUMNS",
        "bootstrap_mean_ci",
        "read_results",
        "summary_table",
        "write_plots",
        "write_report",
        "write_results",
    ),
    "kpo_rs.experiments.bench": (
        "Rate",
        "authors_form",
        "best_rate",
        "numpy_loop",
        "run",
        "torch_loop",
    ),
    "kpo_rs.cli": (
        "COMMANDS",
        "build_parser",
        "main",
        "missing_extra_message",
    ),
}


@pytest.mark.parametrize("module", sorted(SNAPSHOT))
def test_all_matches_the_snapshot(module):
    needs = NEEDS.get(module)
    if needs is not None:
        pytest.importorskip(needs)
    mod = importlib.import_module(module)
    assert tuple(sorted(mod.__all__)) == SNAPSHOT[module]
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == [], f"{module}.__all__ names what it does not define: {missing}"


def test_every_public_module_is_in_the_snapshot():
    """A new public module (no leading underscore anywhere in its path) gets an ``__all__`` and
    an entry here; packages' ``__init__`` count as the package."""
    public = {
        name
        for name in (_module_name(p) for p in PACKAGE.rglob("*.py"))
        if not any(part.startswith("_") for part in name.split("."))
    }
    internal = {"kpo_rs.integrations", "kpo_rs.experiments"}  # namespace docstrings only
    backends = {n for n in public if n.startswith("kpo_rs.backends.")}  # the backend table's
    commands = {n for n in public if n.startswith("kpo_rs.cli.")}  # the kpo subcommands
    assert public - internal - backends - commands == set(SNAPSHOT)
