"""LowRankNPEFF: speed, memory and convergence against named peers, measured in one run.

Reproduce (2-core machine, ~3 minutes; ``--quick`` for a ~30 s smoke run)::

    python benchmarks/bench_low_rank.py
    python benchmarks/bench_low_rank.py --quick
    python benchmarks/bench_low_rank.py --convergence-only --seeds 10

Tables printed:

1. per-iteration time of ``LowRankNPEFF`` against a straightforward SciPy implementation of
   the same iteration (``A @ G.T``, the W step, ``A.T @ (W * AG)`` for the G gradient), on
   PEF-shaped data with nonzeros spread over m = 200k parameters;
2. ``transform`` against a ``fit`` of the same number of iterations;
3. peak memory of a fit (user's input included) against the input's bytes plus the dense
   factors, measured in a fresh subprocess from ``VmHWM`` (peak resident set);
4. iterations and seconds to converge on planted data for the default
   schedule against the reference schedule (random init, fixed lr = 1e-3, multiplicative W
   step), with the recovery of the planted components on each seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

import numpy as np
import scipy.sparse as sp


def spread_lowrank_pefs(n: int, c: int, m: int, k: int, seed: int = 0,
                        dtype=np.float32, sorted_rows: bool = True) -> sp.csr_matrix:
    """Random PEF-shaped rows: ``k`` values per example spread over ``c * m`` columns."""
    rng = np.random.default_rng(seed)
    cols = np.sort(rng.integers(0, c * m, size=(n, k), dtype=np.int64), axis=1)
    keep = np.ones_like(cols, dtype=bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
    counts = keep.sum(axis=1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = cols[keep].astype(np.int32)
    data = rng.standard_normal(indices.size).astype(dtype)
    X = sp.csr_matrix((data, indices, indptr.astype(np.int32)), shape=(n, c * m))
    # unit Frobenius norm of each F_i (as PEFTransformer(normalize=True) produces):
    # ||F_i||^2 = sum_jk (a_ij . a_ik)^2, from the slot rows of A
    A = _reshape(X, c)
    slots = [A[j::c] for j in range(c)]
    fro2 = np.zeros(n)
    for j in range(c):
        for l in range(c):
            s = np.asarray(slots[j].multiply(slots[l]).sum(axis=1), dtype=np.float64).ravel()
            fro2 += s * s
    scale = 1.0 / np.sqrt(np.sqrt(np.maximum(fro2, 1e-30)))
    X = sp.csr_matrix(sp.diags(scale.astype(dtype)) @ X, dtype=dtype)
    if sorted_rows:  # as PEFTransformer writes them
        X.sort_indices()
    return X


class ScipyReference:
    """The straightforward iteration with SciPy sparse products (the peer)."""

    def __init__(self, X: sp.csr_matrix, c: int, r: int, seed: int = 0, lr: float = 1e-3):
        n, w = X.shape
        m = w // c
        self.A = _reshape(X, c)
        self.n, self.c, self.r, self.lr = n, c, r, lr
        rng = np.random.default_rng(seed)
        self.W = rng.uniform(size=(n, r)).astype(X.dtype)
        self.G = (rng.standard_normal((r, m)) * np.sqrt(2.0 / (r * m))).astype(X.dtype)

    def iteration(self) -> None:
        n, c, r = self.n, self.c, self.r
        P = self.A @ self.G.T
        N = (P * P).reshape(n, c, r).sum(axis=1)
        Q = self.G @ self.G.T
        self.W = self.W * N / (self.W @ (Q * Q) + 1e-9)
        R = (P.reshape(n, c, r) * self.W[:, None, :]).reshape(n * c, r)
        grad = ((self.W.T @ self.W) * Q) @ self.G - (self.A.T @ R).T
        self.G = self.G - 4 * self.lr * grad


def _reshape(X: sp.csr_matrix, c: int) -> sp.csr_matrix:
    n, w = X.shape
    m = w // c
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(X.indptr)) * c + X.indices // m
    return sp.csr_matrix((X.data, (rows, X.indices % m)), shape=(n * c, m))


def time_fit(X, c, r, n_iter, **kw) -> float:
    from sknpeff.decomposition import LowRankNPEFF

    est = LowRankNPEFF(n_components=r, n_classes=c, max_iter=n_iter, tol=0, random_state=0,
                       **kw)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    return time.perf_counter() - t, est


def bench_speed(n, c, m, k, r, n_iter) -> None:
    X = spread_lowrank_pefs(n, c, m, k)
    flops = 2 * 2 * X.nnz * r
    print(f"\n## 1. Per-iteration time: n={n} examples x c={c} slots (n*c={n * c} rows), "
          f"m={m} parameters, {X.nnz / n:.0f} values/example, nnz={X.nnz:,}, r={r}")
    ref = ScipyReference(X, c, r)
    ref.iteration()  # warm-up
    t = time.perf_counter()
    for _ in range(n_iter):
        ref.iteration()
    t_ref = (time.perf_counter() - t) / n_iter
    # our per-iteration cost: the wall time of the iterations alone (no set-up, no init,
    # no final coefficient solve)
    t_all, est = time_fit(X, c, r, n_iter)
    t_ours = est._loop_seconds / n_iter
    print("| implementation | s/iteration | GFLOP/s (2 sparse products) | speed-up |")
    print("|---|---|---|---|")
    print(f"| straightforward scipy.sparse | {t_ref:.3f} | {flops / t_ref / 1e9:.2f} | 1.0x |")
    print(f"| LowRankNPEFF (torch CSR column blocks, fused sweep) | {t_ours:.3f} | "
          f"{flops / t_ours / 1e9:.2f} | {t_ref / t_ours:.1f}x |")
    print(f"(LowRankNPEFF set-up: blocking + init + final W solve: "
          f"{t_all - est._loop_seconds:.2f} s)")

    print("\n## 2. transform vs fit of the same number of iterations")
    n_it = 20
    t_fit, _ = time_fit(X, c, r, n_it)
    est.set_params(transform_max_iter=n_it, tol=0)  # exactly n_it W iterations
    t = time.perf_counter()
    est.transform(X)
    t_tr = time.perf_counter() - t
    print("| call | seconds | ratio |\n|---|---|---|")
    print(f"| fit ({n_it} iterations) | {t_fit:.2f} | 1.0x |")
    print(f"| transform ({n_it} W iterations) | {t_tr:.2f} | "
          f"{t_fit / t_tr:.1f}x faster |")


_MEM_CHILD = r"""
import json, sys, warnings, numpy as np
sys.path.insert(0, {bench_dir!r})
from bench_low_rank import spread_lowrank_pefs
from sknpeff.decomposition import LowRankNPEFF
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
X = spread_lowrank_pefs({n}, {c}, {m}, {k}, sorted_rows={sorted_rows})
LowRankNPEFF(n_components=2, n_classes={c}, max_iter=1).fit(X[:50])  # import/warm-up
input_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
import gc; gc.collect()
base = rss('VmRSS:') - input_bytes
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM)
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    est = LowRankNPEFF(n_components={r}, n_classes={c}, max_iter=3, tol=0).fit(X)
peak = rss('VmHWM:') - base
m_kept = est.kept_columns_.size
factors = ({n} * {c} * {r} * 3 + m_kept * {r} * 2 + {n} * {r} * 3) * X.dtype.itemsize
print(json.dumps(dict(input=input_bytes, peak=peak, factors=factors)))
"""


def bench_memory(n, c, m, k, r) -> None:
    import os

    mib = 2.0**20
    print("\n## 3. Peak memory of a fit (fresh process, VmHWM minus the interpreter)")
    print("| input rows | input | dense factors (P, R, N-sized, G, grad, W) | peak, input "
          "included | peak / input | bound 3 x input + factors |")
    print("|---|---|---|---|---|---|")
    for sorted_rows in (True, False):
        code = _MEM_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)),
                                 n=n, c=c, m=m, k=k, r=r, sorted_rows=sorted_rows)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        d = json.loads(out.stdout.strip().splitlines()[-1])
        bound = 3 * d["input"] + d["factors"]
        print(f"| {'sorted' if sorted_rows else 'unsorted'} | {d['input'] / mib:.0f} MiB | "
              f"{d['factors'] / mib:.0f} MiB | {d['peak'] / mib:.0f} MiB | "
              f"{d['peak'] / d['input']:.2f} | {bound / mib:.0f} MiB "
              f"({'within' if d['peak'] <= bound else 'OVER'}) |")


def bench_convergence(seeds) -> None:
    from scipy.optimize import linear_sum_assignment

    from sknpeff.datasets import make_planted_lowrank
    from sknpeff.decomposition import LowRankNPEFF

    schedules = {
        "default (data init, curvature step, HALS W)": dict(),
        "reference (random init, lr=1e-3, MU W)": dict(init="random", learning_rate=1e-3,
                                                        solver="mu", max_iter=1500, tol=0),
        "data init + fixed lr=1e-3 + MU W": dict(init="data", learning_rate=1e-3,
                                                 solver="mu", max_iter=1500, tol=0),
        "random init + curvature step": dict(init="random"),
    }
    print("\n## 4. Convergence on planted data (n=600, m=3000, c=3, r=8)")
    print("iterations to 99% of the loss decrease (first t with L_t - L_end <= "
          "0.01 (L_0 - L_end)), seconds of the whole fit, min matched |cos| of the 8 "
          "planted components")
    print("| schedule | seed | iterations to 99% | fit seconds | min |cos| | final loss |")
    print("|---|---|---|---|---|---|")
    for name, kw in schedules.items():
        for seed in seeds:
            X, _, G = make_planted_lowrank(random_state=seed)
            est = LowRankNPEFF(n_components=8, n_classes=3, random_state=seed, **kw)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit(X)
            dt = time.perf_counter() - t
            lc = np.asarray(est.loss_curve_)
            gap = lc[0] - lc[-1]
            it99 = int(np.argmax(lc - lc[-1] <= 0.01 * gap))
            S = np.abs(G @ est.components_.T)
            rr, cc = linear_sum_assignment(-S)
            print(f"| {name} | {seed} | {it99} | {dt:.2f} | {S[rr, cc].min():.3f} | "
                  f"{lc[-1]:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~30 s)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="planted-data seeds for the convergence table (default 5; 2 quick)")
    ap.add_argument("--convergence-only", action="store_true",
                    help="only the convergence table (seconds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the sparse kernels (default: torch's choice); "
                         "the SciPy peer is single-threaded either way")
    args = ap.parse_args()
    if args.quick:
        sizes = dict(n=1000, c=3, m=50_000, k=1024, r=32)
        n_iter, seeds = 3, [0, 1]
    else:
        sizes = dict(n=10_000, c=3, m=200_000, k=4096, r=64)
        n_iter, seeds = 5, [0, 1, 2, 3, 4]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds:
        seeds = list(range(args.seeds))
    print(f"# LowRankNPEFF benchmark (torch threads: {torch.get_num_threads()})")
    if not args.convergence_only:
        bench_speed(**sizes, n_iter=n_iter)
        bench_memory(**sizes)
    bench_convergence(seeds)


if __name__ == "__main__":
    main()
