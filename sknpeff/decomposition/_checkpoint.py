"""Checkpoint files of a fit: written atomically, refused when they belong to another
fit (their fingerprint differs) or to another format."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

#: what a checkpoint's monitored values mean changed in format 2 (cd: projected-gradient
#: sums instead of losses; low rank: slots compacted), so older checkpoints are refused
CHECKPOINT_FORMAT = 2.0


def load_checkpoint(path: Any, fingerprint: np.ndarray) -> dict | None:
    """The arrays of the checkpoint at ``path``, or None when there is none.

    Parameters
    ----------
    path : str, path-like or None
        The ``checkpoint_path`` (None or empty: no checkpoint).
    fingerprint : ndarray
        Numbers identifying the fit (data, parameters, format).

    Returns
    -------
    arrays : dict or None
        The saved arrays.

    Raises
    ------
    ValueError
        When the checkpoint's fingerprint differs: it belongs to another fit.
    """
    if not path or not os.path.exists(path):
        return None
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    saved = data.get("fingerprint")
    if saved is None or saved.shape != fingerprint.shape or \
            not np.allclose(saved, fingerprint, rtol=1e-9, atol=0):
        raise ValueError(
            f"checkpoint_path={path!r} holds a checkpoint of another fit (different "
            "data or parameters, or written by another sknpeff version); delete it or "
            "choose another path.")
    return data


def save_checkpoint(path: Any, fingerprint: np.ndarray, arrays: dict) -> None:
    """Write ``arrays`` and ``fingerprint`` to ``path`` atomically (a crash never leaves
    half a checkpoint).

    Parameters
    ----------
    path : str or path-like
        The ``checkpoint_path``.
    fingerprint : ndarray
        Numbers identifying the fit.
    arrays : dict of ndarray
        The fit's state.
    """
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=fingerprint, **arrays)
    os.replace(tmp, path)
