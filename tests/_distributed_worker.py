"""One rank of the distributed tests (launched by tests/test_distributed.py via torchrun).

Usage: ``torchrun --standalone --nproc_per_node=2 tests/_distributed_worker.py OUT_DIR``.
Each rank fits on the same planted data and saves its results to ``OUT_DIR/rank<r>.npz``:

* LowRankNPEFF(distributed=True) with one partition per rank, and with two, plus
  ``transform``; and on PEFs with many, mostly empty, class slots;
* DiagonalNPEFF(distributed=True): ``fit_transform`` and ``transform``;
* ``partial_fit`` of both estimators over two batches;
* verbose fits (stdout of rank ``r`` in ``OUT_DIR/stdout_rank<r>.txt``) with a checkpoint
  path of the rank's own (``OUT_DIR/ckpt_rank<r>.npz``: only rank 0 may write it), then a
  fit checkpointed to one shared path and a longer fit resumed from it on every rank;
* both estimators with ``backend="cupy"`` on the fake CuPy of ``_fake_cupy.py``.
"""

import contextlib
import sys
import warnings

import numpy as np
import torch.distributed as dist

from sknpeff.backends import NumpyBackend
from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from tests._helpers import sparse_slot_pefs

#: shared with the test: the single-process reference fits use the same settings
DATA = dict(n_examples=200, n_params=2000, random_state=2, dtype=np.float64)
PARAMS = dict(n_components=8, n_classes=3, random_state=2, max_iter=40, tol=0,
              block_size=256)
DIAG_DATA = dict(n_examples=150, n_params=1500, n_components=5, support_size=100,
                 random_state=3, dtype=np.float64)
DIAG_PARAMS = dict(n_components=5, random_state=3, max_iter=30, tol=0, block_size=128)
#: a vocabulary-sized slot count with 1-4 filled slots per example
SLOT_DATA = dict(n=60, n_slots=2000, m=300, max_filled=4, seed=4)
SLOT_PARAMS = dict(n_components=4, n_classes=2000, random_state=4, max_iter=20, tol=0,
                   block_size=64)
#: the verbose, checkpointed fits: 10 iterations, a checkpoint every 5
VERBOSE_PARAMS = dict(PARAMS, max_iter=10, checkpoint_every=5, verbose=1)
#: iterations of the fit resumed from the shared checkpoint
RESUMED_MAX_ITER = 15


def _install_fake_cupy() -> None:
    """Put tests/_fake_cupy.py in sys.modules as ``cupy`` (for good: a worker process)."""
    import os

    class _Patch:  # the two monkeypatch methods install() uses
        def setitem(self, mapping, key, value):
            mapping[key] = value

        def delitem(self, mapping, key, raising=True):
            mapping.pop(key, None)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _fake_cupy

    _fake_cupy.install(_Patch())


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    X, _, _ = make_planted_lowrank(**DATA)
    Xd, _, _ = make_planted_diagonal(**DIAG_DATA)
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = LowRankNPEFF(**PARAMS, distributed=True)
        res["W"] = est.fit_transform(X)
        res["components"] = est.components_
        res["W_t"] = est.transform(X)
        # two partitions per rank (as two GPUs per rank would be): 4 in all
        est2 = LowRankNPEFF(**PARAMS, backend=NumpyBackend(n_partitions=2), distributed=True)
        res["W2"] = est2.fit_transform(X)
        res["components2"] = est2.components_
        # many class slots, mostly empty (dropped at preparation, on every rank alike)
        slots = LowRankNPEFF(**SLOT_PARAMS, distributed=True)
        res["slots_W"] = slots.fit_transform(sparse_slot_pefs(**SLOT_DATA))
        res["slots_components"] = slots.components_

        diag = DiagonalNPEFF(**DIAG_PARAMS, distributed=True)
        res["diag_W"] = diag.fit_transform(Xd)
        res["diag_components"] = diag.components_
        res["diag_W_t"] = diag.transform(Xd)

        online = LowRankNPEFF(**PARAMS, distributed=True)
        online_diag = DiagonalNPEFF(**DIAG_PARAMS, distributed=True)
        for s in (slice(0, 100), slice(100, None)):
            online.partial_fit(X[s])
            online_diag.partial_fit(Xd[s])
        res["online_components"] = online.components_
        res["online_diag_components"] = online_diag.components_

        with open(f"{out_dir}/stdout_rank{rank}.txt", "w") as f, \
                contextlib.redirect_stdout(f):
            LowRankNPEFF(**VERBOSE_PARAMS, distributed=True,
                         checkpoint_path=f"{out_dir}/ckpt_rank{rank}.npz").fit(X)
            DiagonalNPEFF(**{**DIAG_PARAMS, "max_iter": 10}, checkpoint_every=5, verbose=1,
                          distributed=True,
                          checkpoint_path=f"{out_dir}/diag_ckpt_rank{rank}.npz").fit(Xd)
            # one checkpoint path for all ranks (a shared file system), then a resume
            shared = f"{out_dir}/shared.npz"
            LowRankNPEFF(**VERBOSE_PARAMS, distributed=True, checkpoint_path=shared).fit(X)
            dist.barrier()  # the file is complete before any rank looks for it
            resumed = LowRankNPEFF(**{**VERBOSE_PARAMS, "max_iter": RESUMED_MAX_ITER},
                                   distributed=True, checkpoint_path=shared)
            res["resumed_W"] = resumed.fit_transform(X)
            res["resumed_n_iter"] = resumed.n_iter_
        # the CuPy glue of the distributed backend (DLPack views, device syncs) on the
        # fake CuPy: last, since it replaces the cupy modules of this process
        _install_fake_cupy()
        gpu = LowRankNPEFF(**PARAMS, backend="cupy", distributed=True)
        res["cupy_W"] = gpu.fit_transform(X)
        res["cupy_components"] = gpu.components_
        gpu_diag = DiagonalNPEFF(**DIAG_PARAMS, backend="cupy", distributed=True)
        res["cupy_diag_W"] = gpu_diag.fit_transform(Xd)
    np.savez(f"{out_dir}/rank{rank}.npz", **res)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
