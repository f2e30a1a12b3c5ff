"""One rank of the distributed test (launched by tests/test_distributed.py via torchrun).

Usage: ``torchrun --standalone --nproc_per_node=2 tests/_distributed_worker.py OUT_DIR``.
Each rank fits LowRankNPEFF(distributed=True) on the same planted data (once with one
partition per rank, once with two) and saves ``W`` and ``components_`` to
``OUT_DIR/rank<r>.npz``.
"""

import sys
import warnings

import numpy as np
import torch.distributed as dist

from sknpeff.backends import NumpyBackend
from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import LowRankNPEFF

#: shared with the test: the single-process reference fit uses the same settings
DATA = dict(n_examples=200, n_params=2000, random_state=2, dtype=np.float64)
PARAMS = dict(n_components=8, n_classes=3, random_state=2, max_iter=40, tol=0,
              block_size=256)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    X, _, _ = make_planted_lowrank(**DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = LowRankNPEFF(**PARAMS, distributed=True)
        W = est.fit_transform(X)
        W_t = est.transform(X)
        # two partitions per rank (as two GPUs per rank would be): 4 in all
        est2 = LowRankNPEFF(**PARAMS, backend=NumpyBackend(n_partitions=2), distributed=True)
        W2 = est2.fit_transform(X)
    np.savez(f"{out_dir}/rank{rank}.npz", W=W, components=est.components_, W_t=W_t,
             W2=W2, components2=est2.components_)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
