"""Thread settings of a fit or transform call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..utils import limit_threads

__all__ = ["SMALL_NNZ", "compute_context"]

#: below this many stored values a fit runs torch's sparse kernels on one thread
SMALL_NNZ = 1 << 20


@contextmanager
def compute_context(X: Any) -> Iterator[None]:
    """Thread settings for one fit/transform call, restored on exit.

    BLAS runs on one thread: the dense products of an iteration are small per column
    block (a few thousand rows times r x r) and gain little from threads, while idle
    OpenBLAS threads spinning beside torch's OpenMP threads (the sparse kernels) slowed
    whole fits 3-10x on a loaded 2-core machine. For small inputs (fewer than
    ``SMALL_NNZ`` values) torch's kernels run on one thread too: there, thread start-up
    and spinning cost more than the work (a scikit-learn check on 40 x 10 data took 85 s
    with two threads on a loaded machine, 2.7 s with one). Larger inputs keep torch's
    threads as they are.
    """
    if sp.issparse(X):
        nnz = X.nnz
    else:  # no NumPy dispatch: X may be any array-like (list, DataFrame, ...)
        shape = getattr(X, "shape", None)
        nnz = int(np.prod(shape)) if isinstance(shape, tuple) else SMALL_NNZ
    with limit_threads(1, torch_threads=nnz < SMALL_NNZ):
        yield
