"""DiagonalNPEFF against scikit-learn's NMF on D-PEF-shaped data.

Reproduce (from the repository root; about 10 minutes on 2 cores, --quick about 1):

    .venv/bin/python benchmarks/bench_diagonal.py --threads 1 --skip-peer-nndsvda
    .venv/bin/python benchmarks/bench_diagonal.py --quick --threads 1

(full size: n=10k, K=4096, m=500k, m'=206k, r=64; quick: n=2k, K=1024, r=16;
--threads 1 on a shared, loaded machine, where two-thread torch stalls on many small
products; drop it on an idle one)

Data: planted non-negative components (sparse supports spread over all parameters), each
example a mix of 1-2 of them, then sparsified to its top-K entries and scaled to unit norm,
exactly the layout PEFTransformer produces. The factor's rows (m' x r) do not fit in cache.

Measured in the same run:

1. fit time at the same number of iterations N (tol=0) of DiagonalNPEFF against the named
   peer ``sklearn.decomposition.NMF(solver="mu", init=<same kind>, max_iter=N, tol=0)``,
   and the final loss ``||X - W H||_F^2`` of both (recomputed here in float64);
2. ``transform`` (components frozen, N W-steps, tol=0) against a fit of N iterations;
3. peak resident memory of a fit (input included) in a fresh subprocess, against
   3 x the input's bytes + the dense factors (W and H);
4. iterations to come within 1% of the final loss, HALS ("cd") against multiplicative
   updates ("mu"), both from the same initialization.

Timings are the minimum over ``--repeats`` runs for DiagonalNPEFF (the machine may be
shared); the peer runs once at full size (it takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import scipy.sparse as sp

warnings.filterwarnings("ignore", category=Warning, module="sklearn")
warnings.filterwarnings("ignore", message=".*maximum number of iterations.*")


def make_dpefs(n: int, m: int, r: int, support: int, K: int, seed: int = 0,
               dtype=np.float32) -> sp.csr_matrix:
    """Planted D-PEF-shaped data: top-K of a mix of 1-2 sparse components, unit rows."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(r), support)
    cols = np.concatenate([rng.choice(m, support, replace=False) for _ in range(r)])
    vals = np.abs(rng.standard_normal(r * support)) + 1e-3
    H = sp.csr_matrix((vals, (rows, cols)), shape=(r, m))
    H = sp.diags(1.0 / np.sqrt(np.asarray(H.multiply(H).sum(axis=1)).ravel())) @ H
    n_act = rng.integers(1, 3, size=n)
    wr = np.repeat(np.arange(n), n_act)
    wc = np.concatenate([rng.choice(r, k, replace=False) for k in n_act])
    W = sp.csr_matrix((rng.uniform(0.5, 1.5, size=wr.size), (wr, wc)), shape=(n, r))
    X = (W @ H).tocsr()
    keep = np.zeros(X.nnz, dtype=bool)
    for i in range(n):  # top-K entries of each row
        s, e = X.indptr[i], X.indptr[i + 1]
        if e - s <= K:
            keep[s:e] = True
        else:
            keep[s + np.argpartition(X.data[s:e], -K)[-K:]] = True
    X.data[~keep] = 0
    X.eliminate_zeros()
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    X = sp.csr_matrix(sp.diags(1.0 / norms) @ X, dtype=dtype)
    X.sort_indices()
    return X


def frob_loss(X: sp.csr_matrix, W: np.ndarray, H: np.ndarray) -> float:
    """``||X - W H||_F^2`` in float64 without forming W H (same formula for both)."""
    X = X.astype(np.float64)
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    XHt = np.asarray(X @ H.T)
    return float(X.data @ X.data - 2 * np.sum(W * XHt) + np.sum((W.T @ W) * (H @ H.T)))


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, repeats: int):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_worker(path: str, r: int, solver: str, init: str, max_iter: int) -> None:
    """Run in a subprocess: peak RSS of one fit, the input's load excluded from the base."""
    from sknpeff.decomposition import DiagonalNPEFF

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    # warm-up on a tiny matrix: one-time library initialisation (torch's sparse kernels,
    # lazily imported modules) belongs to the interpreter's base, not to the fit
    warm = sp.random(64, 256, density=0.1, format="csr", random_state=0, dtype=np.float32)
    DiagonalNPEFF(n_components=2, max_iter=2, random_state=0).fit(warm)
    base = status("VmRSS:")  # interpreter + numpy/scipy/torch/sklearn
    X = sp.load_npz(path).tocsr()
    x_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        reset = True
    except OSError:
        reset = False
    est = DiagonalNPEFF(n_components=r, solver=solver, init=init, max_iter=max_iter,
                        tol=0, random_state=0)
    W = est.fit_transform(X)
    peak = status("VmHWM:")
    factors = W.nbytes + est.components_.nbytes
    print(json.dumps(dict(peak_over_base=peak - base, x_bytes=x_bytes, factors=factors,
                          reset=reset)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small problem (about 1 minute)")
    ap.add_argument("--iters", type=int, default=None, help="N for the timed comparison")
    ap.add_argument("--curve-iters", type=int, default=None,
                    help="iterations for the cd-vs-mu convergence comparison")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--skip-peer-nndsvda", action="store_true",
                    help="skip the sklearn init='nndsvda' run (its randomized SVD is slow)")
    ap.add_argument("--threads", type=int, default=None,
                    help="limit torch and BLAS threads for both libraries (on a shared, "
                         "loaded machine 1 avoids spin-wait stalls)")
    ap.add_argument("--peak-worker", nargs=5, metavar=("PATH", "R", "SOLVER", "INIT", "N"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_worker:
        p, r, solver, init, n_it = args.peak_worker
        peak_worker(p, int(r), solver, init, int(n_it))
        return

    from sklearn.decomposition import NMF

    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    from sknpeff.decomposition import DiagonalNPEFF

    if args.quick:
        cfg = dict(n=2000, m=60_000, r=16, support=3000, K=1024)
        N, N_curve, repeats = args.iters or 20, args.curve_iters or 100, args.repeats or 3
    else:
        cfg = dict(n=10_000, m=500_000, r=64, support=8000, K=4096)
        N, N_curve, repeats = args.iters or 10, args.curve_iters or 60, args.repeats or 2
    t = time.perf_counter()
    X = make_dpefs(cfg["n"], cfg["m"], cfg["r"], cfg["support"], cfg["K"])
    r = cfg["r"]
    m_kept = int(np.count_nonzero(np.diff(X.tocsc().indptr)))
    x_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    print(f"data: n={X.shape[0]} m={X.shape[1]} m'={m_kept} nnz={X.nnz} K={cfg['K']} r={r} "
          f"({x_bytes / 2**20:.0f} MiB CSR, made in {time.perf_counter() - t:.1f} s); "
          f"N={N}, {os.cpu_count()} CPUs, torch threads "
          f"{__import__('torch').get_num_threads()}", flush=True)
    rows = []

    def ours(solver, init, max_iter=N):
        est = DiagonalNPEFF(n_components=r, solver=solver, init=init, max_iter=max_iter,
                            tol=0, random_state=0)
        W = est.fit_transform(X)
        return est, W

    def peer(init):
        est = NMF(n_components=r, solver="mu", init=init, max_iter=N, tol=0, random_state=0)
        W = est.fit_transform(X)
        return est, W

    # 1. fit time and loss at the same N ------------------------------------------
    pairs = [(("cd", "random"), "random"), (("mu", "random"), "random")]
    if not args.skip_peer_nndsvda:
        pairs.insert(0, (("cd", "auto"), "nndsvda"))
    peer_cache = {}
    for (solver, init), peer_init in pairs:
        t_ours, (est, W) = timed(lambda s=solver, i=init: ours(s, i), repeats)
        l_ours = frob_loss(X, W, est.components_)
        log(f"DiagonalNPEFF {solver}/{init}: {t_ours:.2f} s, loss {l_ours:.6g}")
        if peer_init not in peer_cache:
            t_peer, (pest, pW) = timed(lambda i=peer_init: peer(i), 1)
            peer_cache[peer_init] = (t_peer, frob_loss(X, pW, pest.components_))
            log(f"NMF mu/{peer_init}: {t_peer:.2f} s, loss {peer_cache[peer_init][1]:.6g}")
        t_peer, l_peer = peer_cache[peer_init]
        rows.append((f"fit N={N}: DiagonalNPEFF(solver={solver!r}, init={init!r}) vs "
                     f"NMF(solver='mu', init={peer_init!r})",
                     t_ours, t_peer, t_peer / t_ours, l_ours, l_peer))

    # 2. transform vs fit at the same number of iterations ---------------------------
    t_fit, (est, W) = timed(lambda: ours("cd", "auto"), repeats)
    est.set_params(tol=0)
    t_tr, _ = timed(lambda: est.transform(X), repeats)
    rows.append((f"transform N={N} W-steps vs fit N={N} (cd, auto)", t_tr, t_fit,
                 t_fit / t_tr, None, None))
    log(f"transform {t_tr:.2f} s vs fit {t_fit:.2f} s")

    # 3. peak memory in a subprocess ------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "X.npz")
        sp.save_npz(path, X, compressed=False)
        out = subprocess.run([sys.executable, __file__, "--peak-worker", path, str(r), "cd",
                              "auto", str(min(N, 5))], capture_output=True, text=True,
                             check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
    budget = 3 * mem["x_bytes"] + mem["factors"]
    log(f"peak memory {mem}")

    # 4. iterations to within 1% of the final loss -------------------------------------
    curves = {}
    for solver in ("cd", "mu"):
        e, _ = ours(solver, "random", max_iter=N_curve)
        curves[solver] = np.asarray(e.loss_curve_)
        log(f"{solver} curve done")
    best = min(c[-1] for c in curves.values())

    def reach(c, target):
        hit = np.flatnonzero(c <= target)
        return int(hit[0]) + 1 if hit.size else None

    # ------------------------------------------------------------------------- table
    print()
    print(f"{'measurement':<78} {'ours s':>8} {'peer s':>8} {'ratio':>7} "
          f"{'loss ours':>11} {'loss peer':>11}")
    for name, a, b, ratio, la, lb in rows:
        ls = f"{la:11.5g} {lb:11.5g}" if la is not None else f"{'':11} {'':11}"
        print(f"{name:<78} {a:8.2f} {b:8.2f} {ratio:6.1f}x {ls}")
    print(f"{'peak RSS of fit (input incl.) / (3 x input + W + H)':<78} "
          f"{mem['peak_over_base'] / 2**20:7.0f}M {budget / 2**20:7.0f}M "
          f"{mem['peak_over_base'] / budget:6.2f}x   (input {mem['x_bytes'] / 2**20:.0f} MiB,"
          f" factors {mem['factors'] / 2**20:.0f} MiB, VmHWM reset: {mem['reset']})")
    for solver, c in curves.items():
        print(f"iterations to within 1% of own final loss ({N_curve} its), {solver}: "
              f"{reach(c, 1.01 * c[-1])}; to within 1% of the best final loss {best:.5g}: "
              f"{reach(c, 1.01 * best)}  (final {c[-1]:.5g})")


if __name__ == "__main__":
    main()
