"""LowRankNPEFF cost against the class-slot count when most slots are empty.

``PEFTransformer(kind="low_rank", min_class_prob=p)`` without ``n_classes`` keeps one
slot per output class (a vocabulary: tens of thousands), of which each example fills only
the few classes at or above ``p``. This script times ``LowRankNPEFF`` fit + transform on
such PEFs: 64 examples, 5,000 parameters, 1-10 filled slots per example (every parameter
stored in a filled slot, as a small model's PEFs are), 8 components, 50 iterations, for
a growing slot count. The stored values are the same at every slot count (only the slot
positions differ), so a cost that follows the stored values is flat across a row.

Each point runs in a fresh process (``--tree`` on ``PYTHONPATH``); the peak resident
memory (``VmHWM``) is printed as the increase over the memory just before the call (the
input included), read from ``/proc`` when a point is stopped at ``--timeout``.
``--parts cotangents`` times ``class_cotangents`` of the PEF side (64 examples, logits
over ``slots`` classes, ``min_class_prob=0.01``), whose result is ``(64, c, slots)``.

Reproduce (2 CPU cores, torch 2.13 CPU)::

    # a checkout of the code before the fix, e.g. git worktree add /tmp/before ef91fed
    .venv/bin/python benchmarks/bench_slots.py --tree /tmp/before --tree . --timeout 120
    .venv/bin/python benchmarks/bench_slots.py --tree /tmp/before --tree . --n-params 500
    .venv/bin/python benchmarks/bench_slots.py --tree /tmp/before --tree . \
        --parts cotangents --slots 300 1000 10000 50000

Measured 2026-11-30 (2 cores shared with other jobs; before and after interleaved
point by point), seconds and peak MiB over the memory before the call. Before, the
loss constant looped over all slot pairs in Python (45,150 pairs at 300 slots, 1.25e9
at 50,000): no point finished within 120 s (one earlier run at 300 slots: 66.9 s);
after, the cost is flat in the slot count.

    fit + transform, 5,000 parameters (1.76M stored values)
    slots       before (ef91fed)            after
      300       >120 s (stopped), >=43      5.81 s, 37
     1000       >120 s (stopped), >=27      4.86 s, 37
    10000       >120 s (stopped), >=41      5.91 s, 37
    50000       >120 s (stopped), >=121     6.59 s, 37

    fit + transform, 500 parameters (176k stored values)
    slots       before (ef91fed)            after
      300       >120 s (stopped), >=10      1.11 s, 11
     1000       >120 s (stopped), >=7       0.72 s, 11
    10000       >120 s (stopped), >=24      0.58 s, 11
    50000       >120 s (stopped), >=102     0.31 s, 11

    class_cotangents, 64 x slots logits, min_class_prob=0.01 (c = 20 kept at 50,000)
    slots       before (ef91fed)            after
      300       0.17 s, 15                  0.07 s, 10
     1000       0.30 s, 38                  0.24 s, 21
    10000       2.43 s, 291                 0.74 s, 164
    50000       10.89 s, 1576               3.14 s, 868
    50000       10.54 s, 1576               2.77 s, 865

(The cotangents are ``(64, c, slots)`` float64 before the cast to float32, 512 MiB at
50,000 slots: what is left is their own size; before, a one-hot of the same size and
its products came on top.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

N_EXAMPLES, MAX_FILLED = 64, 10


def _vm(key: str, pid: int | str = "self") -> float:
    """A ``/proc/<pid>/status`` memory line in MiB (nan when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def make_pefs(n_slots: int, n_params: int = 5000, seed: int = 0):
    """Low-rank PEF rows: example ``i`` fills ``1..MAX_FILLED`` random slots of
    ``n_slots``, each with all ``n_params`` values. The values and the number of filled
    slots per example do not depend on ``n_slots``."""
    import scipy.sparse as sp

    rng = np.random.RandomState(seed)
    filled = rng.randint(1, MAX_FILLED + 1, size=N_EXAMPLES)
    values = rng.randn(int(filled.sum()) * n_params).astype(np.float32)
    slot_rng = np.random.RandomState(seed + 1)
    cols = []
    for k in filled:
        slots = np.sort(slot_rng.choice(n_slots, k, replace=False))
        cols.append((slots[:, None] * n_params + np.arange(n_params)).ravel())
    indptr = np.concatenate([[0], np.cumsum(filled * n_params)])
    return sp.csr_matrix((values, np.concatenate(cols), indptr),
                         shape=(N_EXAMPLES, n_slots * n_params))


def worker_decomposition(n_slots: int, n_params: int) -> dict:
    from sknpeff.decomposition import LowRankNPEFF

    X = make_pefs(n_slots, n_params)
    est = LowRankNPEFF(n_components=8, n_classes=n_slots, max_iter=50, tol=0, random_state=0)
    before = _vm("VmRSS")
    print(json.dumps({"before_mib": before}), flush=True)  # the parent reads it on timeout
    t0 = time.perf_counter()
    est.fit(X)
    W = est.transform(X)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "before_mib": before, "peak_mib": _vm("VmHWM"),
            "nnz": int(X.nnz), "loss": float(est.loss(X, W))}


def worker_cotangents(n_slots: int, n_params: int) -> dict:
    import torch

    from sknpeff.pef._classes import class_cotangents

    logits = torch.randn(N_EXAMPLES, n_slots, generator=torch.Generator().manual_seed(0)) * 6
    before = _vm("VmRSS")
    print(json.dumps({"before_mib": before}), flush=True)
    t0 = time.perf_counter()
    cot, c = class_cotangents(logits, n_slots, min_class_prob=0.01)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "before_mib": before, "peak_mib": _vm("VmHWM"),
            "c": int(c), "sum": float(cot.double().abs().sum())}


def run_point(tree: str, part: str, n_slots: int, n_params: int, timeout: float) -> dict:
    """One point in a fresh process with ``tree`` first on the path."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="2")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, str(n_slots),
           str(n_params)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=os.path.abspath(tree))
    t0 = time.perf_counter()
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:  # the high-water mark so far, then stop
            peak = _vm("VmHWM", proc.pid)
            proc.kill()
            out = proc.communicate()[0].splitlines()
            before = json.loads(out[0])["before_mib"] if out else float("nan")
            return {"timeout": True, "seconds": timeout, "before_mib": before,
                    "peak_mib": peak}
        time.sleep(0.2)
    lines = proc.communicate()[0].splitlines()
    if proc.returncode != 0 or len(lines) < 2:
        return {"error": f"exit status {proc.returncode}"}
    return json.loads(lines[-1])


def _cell(r: dict) -> str:
    if "error" in r:
        return r["error"]
    grown = r["peak_mib"] - r["before_mib"]
    if r.get("timeout"):
        return f">{r['seconds']:.0f} s (stopped), >={grown:.0f} MiB"
    return f"{r['seconds']:.2f} s, {grown:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=None,
                    help="source tree to import sknpeff from (repeat to compare; default .)")
    ap.add_argument("--slots", type=int, nargs="+", default=[300, 1000, 10_000, 50_000])
    ap.add_argument("--n-params", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds before a point is stopped")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--parts", nargs="+", choices=["decomposition", "cotangents"],
                    default=["decomposition"],
                    help="LowRankNPEFF fit + transform, and/or the PEF side's "
                         "class_cotangents")
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        part, n, m = args.worker[0], int(args.worker[1]), int(args.worker[2])
        fn = worker_decomposition if part == "decomposition" else worker_cotangents
        print(json.dumps(fn(n, m)))
        return
    trees = args.tree or ["."]
    for part in args.parts:
        print(f"\n{part}: seconds, peak MiB over the memory before the call")
        print(f"{'slots':>8}  " + "  ".join(f"{t:>34}" for t in trees))
        for n_slots in args.slots:
            for _ in range(args.repeat):
                cells = [_cell(run_point(t, part, n_slots, args.n_params, args.timeout))
                         for t in trees]
                print(f"{n_slots:>8}  " + "  ".join(f"{c:>34}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
