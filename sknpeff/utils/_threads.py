"""Thread limits for torch's intra-op pool and the BLAS libraries, restored on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["limit_threads"]


@contextlib.contextmanager
def limit_threads(n_threads: int | None, *, torch_threads: bool = True,
                  blas_threads: bool = True) -> Iterator[None]:
    """Limit torch's intra-op threads and/or the BLAS thread pools inside the block.

    Small matrices and small batches run about as fast on one thread as on several on an
    idle machine, and many times faster on a busy one, where spinning thread pools fight
    for oversubscribed cores. Both settings are process-wide: they are restored on exit,
    whatever happens inside (an exception or ``KeyboardInterrupt`` included).

    Parameters
    ----------
    n_threads : int or None
        Threads allowed inside the block; ``None`` leaves everything as it is.
    torch_threads : bool, default=True
        Limit torch's intra-op threads (``torch.set_num_threads``). A limit above the
        current number of threads leaves it unchanged.
    blas_threads : bool, default=True
        Limit the BLAS libraries loaded so far (``threadpoolctl``), e.g. the ones
        NumPy and SciPy use.
    """
    if n_threads is None:
        yield
        return
    n_threads = max(1, int(n_threads))
    with contextlib.ExitStack() as stack:
        if blas_threads:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n_threads, user_api="blas"))
        if torch_threads:
            import torch

            saved = torch.get_num_threads()
            if n_threads < saved:
                torch.set_num_threads(n_threads)
                stack.callback(torch.set_num_threads, saved)
        yield
