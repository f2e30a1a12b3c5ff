"""LowRankNPEFF on projected (dense) PEFs.

1. Fit time on dense projected rows against the same values given as CSR (every entry
   stored), interleaved A/B/A/B, ``--n`` examples x 3 slots x ``--d`` columns.
2. Recovery of planted sparse components through the projection: planted low-rank
   PEFs (300 examples, 3000 parameters in three fake layers, 2 class slots, 5
   components of 60 entries, 1-2 active per example) projected slot by slot, fitted,
   and brought back with :func:`sknpeff.pef.recover_components`; prints the smallest
   and mean matched |cos| with the planted components against ``d / s``.

Run: ``python benchmarks/bench_projected_fit.py [--n 2000] [--d 4096]`` (a few minutes
on a loaded 2-core machine; the recovery dominates).

Measured on a shared 2-core CPU: dense 3.2 s, CSR of the same values 11.9 s (3.7x);
recovery min |cos| 0.67 at d/s = 5, 0.995 at 10, 1.000 from 20 on (8 s log(m/s) is
d/s = 31).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.layout import ParameterLayout
from sknpeff.pef import Projection, recover_components
from sknpeff.utils import tag_pef_matrix


def matched_cos(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """|cos| of each true row with its Hungarian-matched found row."""
    a = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-30)
    b = found / np.maximum(np.linalg.norm(found, axis=1, keepdims=True), 1e-30)
    S = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(-S)
    return S[rows, cols]


def dense_vs_csr(n: int, d: int, reps: int = 2) -> None:
    c = 3
    X = np.random.default_rng(0).standard_normal((n, c * d)).astype(np.float32)
    Xs = sp.csr_matrix(X)
    kw = dict(n_components=16, n_classes=c, random_state=0, max_iter=20, tol=0)
    times: dict[str, list[float]] = {"dense": [], "csr": []}
    for _ in range(reps):
        for name, data in (("dense", X), ("csr", Xs)):
            t = time.perf_counter()
            LowRankNPEFF(**kw).fit(data)
            times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"fit of {n} x ({c} x {d}), 20 iterations, r=16: dense {med['dense']:.2f} s, "
          f"CSR of the same values {med['csr']:.2f} s ({med['csr'] / med['dense']:.1f}x)")


def recovery(ratios: list[float]) -> None:
    n, c, r, s = 300, 2, 5, 60
    layout = ParameterLayout(["a.weight", "a.bias", "b.weight"],
                             [(40, 50), (40,), (24, 40)])
    m = layout.n_params
    X, _, G = make_planted_lowrank(n_examples=n, n_params=m, n_classes=c, n_components=r,
                                   support_size=s, n_active=(1, 2), random_state=0)
    print(f"recovery, s={s}, m={m}: 8 s log(m/s) = {8 * s * math.log(m / s):.0f}")
    for ratio in ratios:
        d = int(round(ratio * s))
        R = Projection.for_layout(layout, d, seed=0)
        P = R.apply(torch.from_numpy(X.toarray().reshape(n * c, m))).numpy()
        P = tag_pef_matrix(P.reshape(n, c * d).astype(np.float32), "low_rank", c,
                           R.description())
        est = LowRankNPEFF(r, n_classes=c, random_state=0, max_iter=300).fit(P)
        t = time.perf_counter()
        rec = recover_components(est, max_iter=300, n_stages=4).toarray()
        t = time.perf_counter() - t
        cos = matched_cos(G, rec)
        print(f"  d/s={ratio:5.1f} d={d:5d}: min |cos| {cos.min():.4f}, mean "
              f"{cos.mean():.4f} (recovery {t:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--ratios", type=float, nargs="*", default=[5, 10, 20, 40, 60])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    dense_vs_csr(args.n, args.d)
    recovery(args.ratios)


if __name__ == "__main__":
    main()
