"""The class axis of ``PEFTransformer``: exact eigen slots, and the ablation of the cheap
estimates on a model with many classes, measured in one run.

Reproduce (2-core machine, a few minutes; ``--quick`` for a short smoke run)::

    python benchmarks/bench_class_axis.py
    python benchmarks/bench_class_axis.py --quick

Tables printed:

1. **Few classes, exactly.** For 2- and 3-class MLPs, ``class_axis="eigen"`` (C - 1
   slots) against ``"top"`` with every class (C slots): largest per-example squared
   relative difference of the Fishers (float64), PEF time and ``LowRankNPEFF`` fit time
   (A/B/A/B interleaved, medians; same random initialization and iterations), and the
   matched |cos| of the two fits' components. Three stored-value budgets: every value
   (no sparsification: the same Fishers), the same share of each row (``n_values``
   proportional to the slots, a quarter of a slot's width per slot) and the same
   ``n_values``.
2. **Many classes (ablation).** A small MLP trained in seconds on synthetic data with
   100 classes; for ``s`` = 1, 2, 4, 8, 16 slots: ``"top"`` (the ``s`` most probable
   classes), ``"eigen"`` (the ``s`` largest eigenvalues of ``diag(p) - p p^T``),
   ``"sample"`` and ``"project"`` (unbiased). Columns: mean relative Frobenius error of
   the per-example Fishers against the exact one (all classes, computed from Gram
   matrices of the slot vectors, never forming ``m x m`` matrices; the random ones
   averaged over seeds), and the matched |cos| of ``LowRankNPEFF`` components against
   the fit on the exact PEFs (same random initialization).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from sknpeff import LowRankNPEFF, PEFTransformer


def matched_cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |cos| of the rows of ``a`` with their Hungarian-matched rows of ``b``."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    S = np.abs(a @ b.T)
    r, c = linear_sum_assignment(-S)
    return float(S[r, c].mean())


def train_mlp(n_classes: int, *, dim: int = 16, hidden: int = 12, n: int = 4000,
              spread: float = 1.2, steps: int = 300, seed: int = 0):
    """A small MLP trained on overlapping Gaussian blobs (one per class), and held-out
    examples; label smoothing keeps its predictions spread over several classes."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g)
    y = torch.randint(n_classes, (2 * n,), generator=g)
    X = centers[y] + spread * torch.randn(2 * n, dim, generator=g) / np.sqrt(dim) * 3
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X[:n]), y[:n]).backward()
        opt.step()
    model.eval()
    acc = float((model(X[n:]).argmax(1) == y[n:]).float().mean())
    return model.double(), X[n:].double(), acc


def slot_vectors(model, X, **kw) -> np.ndarray:
    """Unnormalized, unsparsified slot vectors ``(n, c, m)`` (float64)."""
    pt = PEFTransformer(model, kind="low_rank", n_values=10**9, normalize=False,
                        dtype="float64", batch_size=256, **kw).fit(X)
    A = pt.transform(X).toarray()
    return A.reshape(len(X), pt.n_classes_, pt.n_params_)


def rel_frobenius(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Per-example ``||A^T A - B^T B||_F / ||B^T B||_F`` from Gram matrices:
    ``<A^T A, B^T B> = ||A B^T||_F^2``."""
    aa = (np.einsum("ncm,ndm->ncd", A, A) ** 2).sum((1, 2))
    bb = (np.einsum("ncm,ndm->ncd", B, B) ** 2).sum((1, 2))
    ab = (np.einsum("ncm,ndm->ncd", A, B) ** 2).sum((1, 2))
    return np.sqrt(np.maximum(aa + bb - 2 * ab, 0)) / np.sqrt(bb)


def jacobians(model, X) -> tuple[np.ndarray, np.ndarray]:
    """Per-example logit Jacobians ``J`` (n, C, m) with ``torch.func`` and the output
    Fishers ``M = diag(p) - p p^T`` (n, C, C): the exact ``F = J^T M J``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(ps, x):
        return torch.func.functional_call(model, ps, (x[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[k].reshape(len(X), -1, v.numel()) for k, v in params.items()], 2)
    with torch.no_grad():
        p = torch.softmax(model(X), 1)
    M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return J.numpy(), M.numpy()


def rel_error_to_exact(A: np.ndarray, J: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Per-example ``||A^T A - F||_F / ||F||_F`` with ``F = J^T M J``, from small
    matrices only: ``||F||^2 = tr(M K M K)`` (``K = J J^T``), ``<A^T A, F> =
    tr(P^T M P)`` (``P = J A^T``), ``||A^T A||^2 = ||A A^T||^2``."""
    K = np.einsum("ncm,ndm->ncd", J, J)
    MK = M @ K
    ff = np.einsum("nij,nji->n", MK, MK)
    P = np.einsum("ncm,nsm->ncs", J, A)
    af = np.einsum("ncs,ncd,nds->n", P, M, P)
    aa = (np.einsum("ncm,ndm->ncd", A, A) ** 2).sum((1, 2))
    return np.sqrt(np.maximum(aa + ff - 2 * af, 0)) / np.sqrt(ff)


def fit_components(model, X, n_components, max_iter, n_values, **kw):
    pt = PEFTransformer(model, kind="low_rank", n_values=n_values, batch_size=256, **kw)
    pefs = pt.fit(X).transform(X)
    est = LowRankNPEFF(n_components=n_components, n_classes=pt.n_classes_, init="random",
                       max_iter=max_iter, tol=0.0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        est.fit(pefs)
    return est.components_, time.perf_counter() - t0


def few_classes(quick: bool) -> None:
    print("\n1. Few classes, exactly: class_axis='eigen' (C-1 slots) vs 'top' (C slots)")
    n = 600 if quick else 1500
    reps = 2 if quick else 3
    print(f"   {n} examples, LowRankNPEFF r=8, 100 iterations, medians of {reps} "
          "interleaved runs")
    hdr = (f"   {'C':>2} {'budget':>12} {'|dF|²/|F|²':>11} {'PEF top s':>10} {'eigen s':>8} "
           f"{'ratio':>6} {'fit top s':>10} {'eigen s':>8} {'ratio':>6} {'C/(C-1)':>7} "
           f"{'|cos|':>6}")
    print(hdr)
    for C in (2, 3):
        model, X, _ = train_mlp(C, dim=32, hidden=64, n=n, seed=C, steps=150)
        A = slot_vectors(model, X[:200])
        B = slot_vectors(model, X[:200], class_axis="eigen")
        dF = rel_frobenius(B, A).max() ** 2  # squared: its square root amplifies rounding
        m = sum(p.numel() for p in model.parameters())
        for budget in ("all", "proportional", "same"):
            per_slot = m // 4
            nv = {"top": per_slot * C,
                  "eigen": per_slot * (C - 1) if budget == "proportional" else per_slot * C}
            if budget == "all":  # no sparsification: both hold the same Fishers
                nv = {"top": 10**9, "eigen": 10**9}
            pef_t = {"top": [], "eigen": []}
            fit_t = {"top": [], "eigen": []}
            comps = {}
            for _ in range(reps):
                for axis in ("top", "eigen"):  # A/B/A/B
                    t0 = time.perf_counter()
                    pt = PEFTransformer(model, kind="low_rank", n_values=nv[axis],
                                        class_axis=axis, batch_size=256).fit(X)
                    pefs = pt.transform(X)
                    pef_t[axis].append(time.perf_counter() - t0)
                    est = LowRankNPEFF(n_components=8, n_classes=pt.n_classes_,
                                       init="random", max_iter=100, tol=0.0, random_state=0)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        est.fit(pefs)
                    fit_t[axis].append(time.perf_counter() - t0)
                    comps[axis] = est.components_
            pt_, pe_ = np.median(pef_t["top"]), np.median(pef_t["eigen"])
            ft_, fe_ = np.median(fit_t["top"]), np.median(fit_t["eigen"])
            cos = matched_cos(comps["top"], comps["eigen"])
            print(f"   {C:>2} {budget:>12} {dF:>11.1e} {pt_:>10.2f} {pe_:>8.2f} "
                  f"{pt_ / pe_:>6.2f} {ft_:>10.2f} {fe_:>8.2f} {ft_ / fe_:>6.2f} "
                  f"{C / (C - 1):>7.2f} {cos:>6.3f}")


def many_classes(quick: bool) -> None:
    C = 100
    n = 100 if quick else 200
    seeds = 4 if quick else 6
    slots = (1, 2, 4, 8, 16)
    model, X, acc = train_mlp(C, dim=12, hidden=8, seed=0)
    X = X[:n]
    m = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        p = torch.softmax(model(X), 1).sort(1, descending=True).values
    print(f"\n2. Many classes: an MLP with {C} classes and {m} parameters (held-out accuracy "
          f"{acc:.2f}; mean top-1 probability {float(p[:, 0].mean()):.2f}, top-16 mass "
          f"{float(p[:, :16].sum(1).mean()):.2f}), {n} examples")
    J, M = jacobians(model, X)
    n_comp, iters, n_values = 8, (100 if quick else 200), 1024
    t0 = time.perf_counter()
    ref, _ = fit_components(model, X, n_comp, iters, n_values, class_axis="eigen")
    print(f"   exact-class PEFs (eigen, {C - 1} slots) and their fit: "
          f"{time.perf_counter() - t0:.1f} s")
    # how much two fits on the exact PEFs differ by initialization alone: the noise floor
    pt = PEFTransformer(model, kind="low_rank", n_values=n_values, class_axis="eigen")
    est = LowRankNPEFF(n_components=n_comp, n_classes=C - 1, init="random", max_iter=iters,
                       tol=0.0, random_state=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = est.fit(pt.fit(X).transform(X)).components_
    print(f"   exact fit vs exact fit from another initialization: matched |cos| "
          f"{matched_cos(ref, other):.3f}")
    print("   cells: relative Frobenius error of F (mean over examples; random ones: mean "
          f"over {seeds} seeds) | matched |cos| of LowRankNPEFF components (r={n_comp}, "
          f"n_values={n_values}) with the exact-class fit")
    print(f"   {'s':>3} " + " ".join(f"{a:>15}" for a in ("top", "eigen", "sample", "project")))
    for s in slots:
        cells = []
        for axis in ("top", "eigen", "sample", "project"):
            random = axis in ("sample", "project")
            errs = []
            for seed in range(seeds if random else 1):
                kw = dict(class_axis=axis, n_classes=s)
                if random:
                    kw["random_state"] = seed
                errs.append(rel_error_to_exact(slot_vectors(model, X, **kw), J, M).mean())
            kw = dict(class_axis=axis, n_classes=s)
            if random:
                kw["random_state"] = 0
            comps, _ = fit_components(model, X, n_comp, iters, n_values, **kw)
            cells.append(f"{np.mean(errs):6.3f} | {matched_cos(ref, comps):5.3f}")
        print(f"   {s:>3} " + " ".join(f"{c:>15}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--part", choices=("all", "few", "many"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.part in ("all", "few"):
        few_classes(args.quick)
    if args.part in ("all", "many"):
        many_classes(args.quick)


if __name__ == "__main__":
    main()
