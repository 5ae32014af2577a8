"""Helpers of the backends that run on the host through numpy (rust, reference)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_numpy", "to_torch"]


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A CPU tensor's data as an ndarray (no copy), or None."""
    if t is None:
        return None
    return t.detach().numpy() if t.device.type == "cpu" else t.detach().cpu().numpy()


def to_torch(arrays: tuple[np.ndarray, ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """numpy results as tensors with ``like``'s device and dtype (no copy where they match)."""
    out = tuple(torch.from_numpy(a) for a in arrays)
    if like.device.type == "cpu" and all(t.dtype == like.dtype for t in out):
        return out
    return tuple(t.to(device=like.device, dtype=like.dtype) for t in out)
