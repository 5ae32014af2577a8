"""The matplotlib plumbing shared by the package's figures (diagnostics, demo, sweep report):
the headless backend, the one error message for a missing matplotlib, and how a finished axes is
written (legend, tight layout, PNG, figure closed)."""

from __future__ import annotations

from typing import Any

__all__ = ["available", "pyplot", "save"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend; ImportError naming the extra to
    install when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'kpo-rs[demo]'") from exc
    return plt


def available() -> bool:
    """Whether :func:`pyplot` can be imported (the optional plots are skipped otherwise)."""
    try:
        pyplot()
    except ImportError:
        return False
    return True


def save(fig: Any, ax: Any, path: Any, *, dpi: int = 110) -> Any:
    """Adds ``ax``'s legend (when ``ax`` is not None), lays ``fig`` out, writes it to ``path``
    (PNG) and closes it; returns ``path``."""
    if ax is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
