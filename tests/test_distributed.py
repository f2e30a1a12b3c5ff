"""distributed=True: two CPU ranks (gloo) give the single-process fit, identically.

One torchrun launch (module fixture) runs every scenario of ``_distributed_worker.py``;
the tests below check its outputs: equality with the single-process fits (both
estimators, transform and partial_fit), and that only rank 0 prints and writes
checkpoints.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sknpeff.backends import NumpyBackend
from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from tests._helpers import sparse_slot_pefs

dist = pytest.importorskip("torch.distributed")

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_distributed_worker.py"


def _gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def _launch(n_ranks: int, out_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n_ranks}", str(WORKER), str(out_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch of 2 gloo ranks (the worker runs every scenario); its output
    directory and the seconds it took."""
    if not _gloo_available():
        pytest.skip("torch.distributed with gloo unavailable")
    out_dir = tmp_path_factory.mktemp("two_ranks")
    t0 = time.perf_counter()
    res = _launch(2, out_dir)
    if res.returncode != 0:
        out = res.stdout + res.stderr
        if any(s in out for s in ("Address family not supported", "Permission denied",
                                  "Cannot assign requested address",
                                  "errno: 97", "EADDRNOTAVAIL")):
            pytest.skip(f"local process group could not start: {out[-500:]}")
        pytest.fail(f"torchrun failed (rc={res.returncode}):\n{out[-4000:]}")
    return out_dir, time.perf_counter() - t0, res.stdout


def _ranks(out_dir):
    return np.load(out_dir / "rank0.npz"), np.load(out_dir / "rank1.npz")


def test_two_ranks_equal_single_process(two_ranks):
    out_dir, elapsed, _ = two_ranks
    from tests import _distributed_worker as w
    r0, r1 = _ranks(out_dir)
    # every rank ends with identical W and components_ (bit for bit)
    for key in r0.files:
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
    X, _, _ = make_planted_lowrank(**w.DATA)
    # the same column partitions in one process: the same sums in the same order
    ref2 = LowRankNPEFF(**w.PARAMS, backend=NumpyBackend(n_partitions=2))
    W2 = ref2.fit_transform(X)
    np.testing.assert_allclose(r0["W"], W2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r0["components"], ref2.components_, rtol=1e-10, atol=1e-12)
    # the default single-process fit, to 1e-5
    ref = LowRankNPEFF(**w.PARAMS)
    W1 = ref.fit_transform(X)
    np.testing.assert_allclose(r0["W"], W1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r0["components"], ref.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r0["W_t"], ref.transform(X), rtol=1e-5, atol=1e-7)
    # two partitions per rank = four partitions in one process
    ref4 = LowRankNPEFF(**w.PARAMS, backend=NumpyBackend(n_partitions=4))
    np.testing.assert_allclose(r0["W2"], ref4.fit_transform(X), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r0["components2"], ref4.components_, rtol=1e-10, atol=1e-12)
    # mostly empty class slots: the two-partition fit in one process
    ref_slots = LowRankNPEFF(**w.SLOT_PARAMS, backend=NumpyBackend(n_partitions=2))
    W_slots = ref_slots.fit_transform(sparse_slot_pefs(**w.SLOT_DATA))
    np.testing.assert_allclose(r0["slots_W"], W_slots, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r0["slots_components"], ref_slots.components_, rtol=1e-10,
                               atol=1e-12)
    assert elapsed < 90, f"two-rank run took {elapsed:.1f} s"


def test_two_ranks_diagonal_and_partial_fit(two_ranks):
    out_dir, _, _ = two_ranks
    from tests import _distributed_worker as w
    r0, _ = _ranks(out_dir)
    Xd, _, _ = make_planted_diagonal(**w.DIAG_DATA)
    ref = DiagonalNPEFF(**w.DIAG_PARAMS)
    np.testing.assert_allclose(r0["diag_W"], ref.fit_transform(Xd), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r0["diag_components"], ref.components_, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(r0["diag_W_t"], ref.transform(Xd), rtol=1e-5, atol=1e-7)
    X, _, _ = make_planted_lowrank(**w.DATA)
    online = LowRankNPEFF(**w.PARAMS, backend=NumpyBackend(n_partitions=2))
    online_diag = DiagonalNPEFF(**w.DIAG_PARAMS, backend=NumpyBackend(n_partitions=2))
    for s in (slice(0, 100), slice(100, None)):
        online.partial_fit(X[s])
        online_diag.partial_fit(Xd[s])
    np.testing.assert_allclose(r0["online_components"], online.components_, rtol=1e-8,
                               atol=1e-10)
    np.testing.assert_allclose(r0["online_diag_components"], online_diag.components_,
                               rtol=1e-8, atol=1e-10)


def test_two_ranks_cupy_glue_on_fake_cupy(two_ranks):
    """DistributedBackend over CupyBackend (DLPack views, syncs) on the fake CuPy: the
    fits equal the CPU ranks' fits (same partitions, same sums)."""
    out_dir, _, _ = two_ranks
    r0, r1 = _ranks(out_dir)
    for key in ("W", "components", "diag_W"):
        np.testing.assert_array_equal(r0[f"cupy_{key}"], r1[f"cupy_{key}"])
        np.testing.assert_allclose(r0[f"cupy_{key}"], r0[key], rtol=1e-10, atol=1e-12)


def test_two_ranks_only_rank0_prints_and_checkpoints(two_ranks):
    out_dir, _, launcher_out = two_ranks
    from tests import _distributed_worker as w
    out0 = (out_dir / "stdout_rank0.txt").read_text()
    out1 = (out_dir / "stdout_rank1.txt").read_text()
    assert out1 == "", f"rank 1 printed:\n{out1}"
    lines = out0.splitlines()
    # every progress line once (rank 0's): two full LowRankNPEFF fits and one resumed
    # from iteration 10, one DiagonalNPEFF fit
    def count(prefix: str) -> int:
        return sum(line.startswith(prefix) for line in lines)

    assert count("[LowRankNPEFF] fit iteration    1 ") == 2, out0
    assert count("[LowRankNPEFF] fit iteration   10 ") == 2
    assert count("[LowRankNPEFF] resuming from") == 1
    assert count("[LowRankNPEFF] fit iteration   11 ") == 1
    assert count(f"[LowRankNPEFF] fit iteration   {w.RESUMED_MAX_ITER} ") == 1
    assert count("[LowRankNPEFF] fit done") == 3
    assert count("[DiagonalNPEFF] fit iteration    1 ") == 1
    assert count("[DiagonalNPEFF] fit iteration   10 ") == 1
    assert "iteration" not in launcher_out  # nothing else reached the console
    # only rank 0 writes checkpoints (rank 1's path stays unwritten)
    for name in ("ckpt", "diag_ckpt"):
        assert (out_dir / f"{name}_rank0.npz").exists()
        assert not (out_dir / f"{name}_rank1.npz").exists()
    with np.load(out_dir / "ckpt_rank0.npz") as ck:
        assert int(ck["n_iter"]) == 10
    # the shared checkpoint resumed the fit on every rank, identically
    r0, r1 = _ranks(out_dir)
    assert int(r0["resumed_n_iter"]) == int(r1["resumed_n_iter"]) == w.RESUMED_MAX_ITER
    np.testing.assert_array_equal(r0["resumed_W"], r1["resumed_W"])
    with np.load(out_dir / "shared.npz") as ck:
        assert int(ck["n_iter"]) == w.RESUMED_MAX_ITER


def test_distributed_needs_initialized_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    X, _, _ = make_planted_lowrank(n_examples=20, n_params=100, support_size=10,
                                   random_state=0)
    est = LowRankNPEFF(n_components=2, n_classes=3, max_iter=2, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        est.fit(X)

