"""Peak memory of model-wide work against the number of examples it reads.

Reproduce (2 CPU cores, torch 2.13 CPU)::

    .venv/bin/python benchmarks/bench_memory.py                # ~2-4 minutes
    .venv/bin/python benchmarks/bench_memory.py --n-fisher 8 16 32 64

What is measured: ``GuidedPerturber(DiagonalNPEFF).fit(X, W, n_fisher=N)`` on a
10.5M-parameter MLP (1024-2048-2048-2048-10), which computes the dataset-level diagonal
Fisher (the mean of the unnormalized per-example diagonal Fishers of ``N`` examples).
Each ``N`` runs in a fresh process; the peak resident memory (``VmHWM``) is printed beside
the process's memory just before the call (model, components and inputs), so the
difference is what the call itself needed. A flat column means memory O(n_params)
whatever ``N``; a full-width matrix of every example's Fisher would grow by
``12 bytes * n_params`` (about 126 MB) per example.

Measured 2026-11-30 (2 shared cores), peak minus before, MiB (seconds):

    n_fisher   streamed (this code)   full-width matrix, then its mean (before)
           8            581 (5.7 s)       2033 (14.4 s)
          32            588 (25.3 s)      7774 (56.3 s)

(The "before" column ran this script against the previous commit's package.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    return float("nan")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)).eval()


def worker(n_fisher: int) -> dict:
    from sknpeff import DiagonalNPEFF, GuidedPerturber, PEFTransformer

    torch.set_num_threads(2)
    model = _model()
    X = torch.randn(max(n_fisher, 16), 1024, generator=torch.Generator().manual_seed(1))
    pef = PEFTransformer(model, kind="diagonal", n_values=4096).fit(X[:16])
    pefs = pef.transform(X[:16])
    est = DiagonalNPEFF(n_components=2, random_state=0, max_iter=20).fit(pefs)
    W = np.abs(np.random.default_rng(0).random((X.shape[0], 2)))
    gp = GuidedPerturber(est, model, layout=pef.layout_)
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    gp.fit(X, W, n_fisher=n_fisher, random_state=0)
    seconds = time.perf_counter() - t0
    return {"n_fisher": n_fisher, "n_params": pef.n_params_, "before_mib": before,
            "peak_mib": _vm("VmHWM"), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-fisher", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker)))
        return
    print("GuidedPerturber(DiagonalNPEFF).fit: dataset Fisher of n_fisher examples, "
          "fresh process each")
    print(f"{'n_fisher':>9} {'n_params':>10} {'before (MiB)':>13} {'peak (MiB)':>11} "
          f"{'peak - before':>14} {'seconds':>8}")
    for n in args.n_fisher:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(n)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n_fisher']:>9} {r['n_params']:>10} {r['before_mib']:>13.0f} "
              f"{r['peak_mib']:>11.0f} {r['peak_mib'] - r['before_mib']:>14.0f} "
              f"{r['seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
