"""Array backends: what the array API lacks (sparse products, all-reduce, placement).

``get_backend`` resolves the estimators' ``backend=`` parameter.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._base import Backend
from ._blocks import ColumnBlocks
from ._numpy import NumpyBackend

__all__ = ["Backend", "ColumnBlocks", "NumpyBackend", "cupy_device", "from_device",
           "get_backend", "is_cupy_array", "to_device"]


def is_cupy_array(x: Any) -> bool:
    """True when ``x`` is a CuPy array or CuPy sparse matrix (without importing CuPy).

    A CuPy object can only exist once CuPy is imported, so the types are looked up in
    ``sys.modules``; the module name of ``x``'s type is the fallback.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return True
    sparse = sys.modules.get("cupyx.scipy.sparse")
    if sparse is not None and isinstance(x, getattr(sparse, "spmatrix", ())):
        return True
    mod = type(x).__module__ or ""
    return mod == "cupy" or mod.startswith(("cupy.", "cupyx."))


def cupy_device(x: Any) -> int | None:
    """The CUDA device id of a CuPy array or sparse matrix; None for anything else.

    This is what decides the output type of the estimators: CuPy input gives CuPy
    output on the input's device, anything else NumPy (scikit-learn's array API
    dispatch does the same).
    """
    if not is_cupy_array(x):
        return None
    cupy = sys.modules.get("cupy")
    # a CuPy sparse matrix has a ``device`` property that raises NotImplementedError
    # (CuPy 14), so its values array says where it lives
    arr = x if cupy is not None and isinstance(x, cupy.ndarray) else x.data
    return int(arr.device.id)


def from_device(x: Any) -> Any:
    """A host copy of a CuPy array (NumPy) or sparse matrix (SciPy, same format);
    anything else is returned as it is."""
    return x.get() if is_cupy_array(x) else x


def to_device(x: Any, device: int | None) -> Any:
    """``x`` (a NumPy array) as a CuPy array on ``device``; as it is when ``device`` is
    None or ``x`` is not a NumPy array (a scalar, an estimator)."""
    if device is None or not isinstance(x, np.ndarray):
        return x
    import cupy

    if isinstance(x, cupy.ndarray) and x.device.id == device:
        return x
    with cupy.cuda.Device(device):
        return cupy.asarray(x)


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
        GPU ids for the CuPy backend. Default: the device of a CuPy ``X``, else 0.
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
    if devices is None:  # compute where the input lives
        devices = cupy_device(X)
    return CupyBackend(devices=devices)
