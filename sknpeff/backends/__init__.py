"""Array backends: what the array API lacks (sparse products, all-reduce, placement).

``get_backend`` resolves the estimators' ``backend=`` parameter.
"""

from __future__ import annotations

from typing import Any

from ._base import Backend
from ._blocks import ColumnBlocks
from ._numpy import NumpyBackend

__all__ = ["Backend", "ColumnBlocks", "NumpyBackend", "get_backend", "is_cupy_array"]


def is_cupy_array(x: Any) -> bool:
    """True when ``x`` is a CuPy array or CuPy sparse matrix (without importing CuPy)."""
    mod = type(x).__module__ or ""
    return mod.startswith("cupy") or mod.startswith("cupyx")


def get_backend(backend: str | Backend = "auto", *, X: Any = None,
                devices: Any = None, distributed: bool = False) -> Backend:
    """Resolve an estimator's ``backend`` parameter.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy"} or Backend
        ``"auto"`` picks CuPy when ``X`` is a CuPy array or ``devices`` names GPUs, and
        the NumPy/SciPy backend otherwise. A :class:`Backend` instance is used as is.
    X : array-like, optional
        The input, to detect CuPy arrays.
    devices : list of int, optional
        GPU ids for the CuPy backend.
    distributed : bool, default=False
        Spread the columns over the ranks of the initialized ``torch.distributed``
        process group (see :mod:`sknpeff.backends._distributed`); a :class:`Backend`
        instance is then the rank's local backend.

    Returns
    -------
    Backend
    """
    if distributed:
        from ._distributed import DistributedBackend

        if isinstance(backend, DistributedBackend):
            return backend
        local = get_backend(backend, X=X, devices=devices)
        return DistributedBackend(local)
    if isinstance(backend, Backend):
        return backend
    if backend not in ("auto", "numpy", "cupy"):
        raise ValueError(
            f"backend must be 'auto', 'numpy', 'cupy' or a Backend instance, got {backend!r}."
        )
    if backend == "auto":
        backend = "cupy" if (devices is not None or (X is not None and is_cupy_array(X))) \
            else "numpy"
    if backend == "numpy":
        if devices is not None:
            raise ValueError("devices is only supported with backend='cupy'.")
        return NumpyBackend()
    try:
        from ._cupy import CupyBackend
    except ImportError as exc:
        raise ImportError(
            "backend='cupy' needs CuPy and a CUDA GPU: pip install 'sknpeff[cuda]'."
        ) from exc
    return CupyBackend(devices=devices)
