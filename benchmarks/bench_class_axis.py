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
2. **Many classes (ablation).** Gated experts (``make_gated_experts``) with 100 classes
   and 8 experts, each example switching on one: planted, well-separated components
   (one per expert), so the fit on the exact PEFs is reproducible and comparing other
   fits with it measures the class axis, not the fit's own seed noise. First the noise
   floor: the exact fit against itself from other seeds (default and random
   initialization), and on another draw of examples; and, for contrast,
   ``LowRankNPEFF`` on the same exact PEFs from other seeds (its per-example Fishers
   have rank 99 here, and its fits land in different local minima). Then, for ``s`` =
   1, 2, 4, 8, 16 slots: ``"top"`` (the ``s`` most probable classes), ``"eigen"`` (the
   ``s`` largest eigenvalues of ``diag(p) - p p^T``), ``"sample"`` and ``"project"``
   (unbiased). Columns: mean relative Frobenius error of the per-example Fishers
   against the exact one (computed from Gram matrices of the slot vectors, never
   forming ``m x m`` matrices), the same for their diagonals, and the mean cosine of
   the ``DiagonalNPEFF`` components with their Hungarian-matched exact-fit components
   (``pseudo_fisher_cosines``); the random axes averaged over seeds.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from sknpeff import DiagonalNPEFF, LowRankNPEFF, PEFTransformer
from sknpeff.datasets import make_gated_experts
from sknpeff.inspection import pseudo_fisher_cosines


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
    MK = M @ (J @ J.transpose(0, 2, 1))  # batched BLAS products, not einsum loops
    ff = np.einsum("nij,nji->n", MK, MK)
    P = J @ A.transpose(0, 2, 1)
    af = np.einsum("ncs,ncd,nds->n", P, M, P, optimize=True)
    aa = ((A @ A.transpose(0, 2, 1)) ** 2).sum((1, 2))
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
            cos = matched_cos_low_rank(comps["top"], comps["eigen"])
            print(f"   {C:>2} {budget:>12} {dF:>11.1e} {pt_:>10.2f} {pe_:>8.2f} "
                  f"{pt_ / pe_:>6.2f} {ft_:>10.2f} {fe_:>8.2f} {ft_ / fe_:>6.2f} "
                  f"{C / (C - 1):>7.2f} {cos:>6.3f}")


def gated_model(n: int, *, n_experts: int = 8):
    """A gated-experts classifier with 100 classes (random weights, no training), ``n``
    examples that each switch on exactly one expert, and ``n`` more from another draw:
    every example's Fisher lies in its expert's parameters (and the shared output
    bias), so NPEFF has planted, well-separated components, one per expert."""
    model, sample, _ = make_gated_experts(n_experts=n_experts, n_noise=4, n_classes=100,
                                          hidden=4, concepts_per_example=(1, 1),
                                          random_state=0)
    X, _ = sample(n, random_state=1)
    X_other, _ = sample(n, random_state=2)
    return model.double(), X.double(), X_other.double()


def matched_cos_diagonal(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of the diagonal pseudo-Fishers ``a`` with their Hungarian-matched
    rows of ``b`` (both ``(r, n_params)``, non-negative)."""
    r = a.shape[0]
    S = pseudo_fisher_cosines(np.vstack([a, b]), kind="diagonal")[:r, r:]
    rows, cols = linear_sum_assignment(-S)
    return float(S[rows, cols].mean())


def matched_cos_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """Mean ``|cos|`` of the pseudo-Fisher vectors ``a`` with their Hungarian-matched
    rows of ``b`` (``pseudo_fisher_cosines`` gives ``cos^2`` for vectors)."""
    r = a.shape[0]
    S = np.sqrt(pseudo_fisher_cosines(np.vstack([a, b]), kind="low_rank")[:r, r:])
    rows, cols = linear_sum_assignment(-S)
    return float(S[rows, cols].mean())


def diagonal_components(model, X, n_components, max_iter, n_values, *, seed=0,
                        init="auto", **kw) -> np.ndarray:
    pt = PEFTransformer(model, kind="diagonal", n_values=n_values, batch_size=256, **kw)
    est = DiagonalNPEFF(n_components=n_components, init=init, max_iter=max_iter, tol=0.0,
                        random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(pt.fit(X).transform(X)).components_


def low_rank_floor(model, X, n_components, max_iter, seeds) -> list[float]:
    """Matched |cos| of ``LowRankNPEFF`` fits on the exact PEFs, seed 0 against others."""
    pt = PEFTransformer(model, kind="low_rank", n_values=8192, class_axis="eigen",
                        batch_size=256).fit(X)
    pefs = pt.transform(X)
    comps = []
    for seed in (0, *seeds):
        est = LowRankNPEFF(n_components=n_components, n_classes=pt.n_classes_,
                           max_iter=max_iter, tol=0.0, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comps.append(est.fit(pefs).components_)
    return [matched_cos_low_rank(comps[0], c) for c in comps[1:]]


def diagonal_error(A: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per-example ``||diag(A^T A) - diag(F)|| / ||diag(F)||``."""
    return np.linalg.norm((A**2).sum(1) - exact, axis=1) / np.linalg.norm(exact, axis=1)


def many_classes(quick: bool) -> None:
    C, E = 100, 8
    n = 120 if quick else 200
    seeds = 2 if quick else 3
    slots = (1, 2, 4, 8, 16)
    model, X, X_other = gated_model(n, n_experts=E)
    m = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        p = torch.softmax(model(X), 1).sort(1, descending=True).values
    print(f"\n2. Many classes: gated experts with {C} classes, {E} experts and {m} "
          f"parameters, {n} examples with one expert each (mean top-1 probability "
          f"{float(p[:, 0].mean()):.2f}, top-16 mass {float(p[:, :16].sum(1).mean()):.2f})")
    J, M = jacobians(model, X)
    exact_slots = slot_vectors(model, X, class_axis="eigen")
    exact_diag = (exact_slots**2).sum(1)
    err_eigen_all = rel_error_to_exact(exact_slots, J, M).max()
    iters, n_values = 300, 1024
    t0 = time.perf_counter()
    ref = diagonal_components(model, X, E, iters, n_values, class_axis="eigen")
    print(f"   exact PEFs (eigen, {C - 1} slots: largest relative error of F "
          f"{err_eigen_all:.1e}) and their DiagonalNPEFF fit (r={E}, n_values={n_values}, "
          f"{iters} iterations): {time.perf_counter() - t0:.1f} s")
    # the noise floor: the same exact PEFs, fitted from other initializations
    floor_auto = [matched_cos_diagonal(ref, diagonal_components(
        model, X, E, iters, n_values, seed=s, class_axis="eigen")) for s in range(1, seeds + 1)]
    floor_rand = [matched_cos_diagonal(ref, diagonal_components(
        model, X, E, iters, n_values, seed=s, init="random", class_axis="eigen"))
        for s in range(1, seeds + 1)]
    other_examples = matched_cos_diagonal(ref, diagonal_components(
        model, X_other, E, iters, n_values, class_axis="eigen"))
    lr_floor = low_rank_floor(model, X, E, iters, range(1, 3))
    print("   noise floor, matched cosine of components with the exact fit's (min / mean "
          f"over {seeds} other seeds):")
    print(f"     exact, other seed (default init):  {min(floor_auto):.3f} / "
          f"{np.mean(floor_auto):.3f}")
    print(f"     exact, other seed (random init):   {min(floor_rand):.3f} / "
          f"{np.mean(floor_rand):.3f}")
    print(f"     exact, other {n} examples:         {other_examples:.3f}")
    print(f"     LowRankNPEFF, exact, other seed:   {min(lr_floor):.3f} / {np.mean(lr_floor):.3f}"
          "  (2 other seeds; too unstable to compare class axes with)")
    print("   cells: relative Frobenius error of F | relative error of diag(F) | matched "
          "cosine of DiagonalNPEFF components with the exact fit's (mean over examples; "
          f"sample and project: mean over {seeds} seeds)")
    axes = ("top", "eigen", "sample", "project")
    print(f"   {'s':>3} " + " ".join(f"{a:>21}" for a in axes))
    for s in slots:
        cells = []
        for axis in axes:
            random = axis in ("sample", "project")
            errs, derrs, sims = [], [], []
            for seed in range(seeds if random else 1):
                kw = dict(class_axis=axis, n_classes=s)
                if random:
                    kw["random_state"] = seed
                A = slot_vectors(model, X, **kw)
                errs.append(rel_error_to_exact(A, J, M).mean())
                derrs.append(diagonal_error(A, exact_diag).mean())
                sims.append(matched_cos_diagonal(
                    ref, diagonal_components(model, X, E, iters, n_values, **kw)))
            cells.append(f"{np.mean(errs):5.3f} | {np.mean(derrs):5.3f} | "
                         f"{np.mean(sims):5.3f}")
        print(f"   {s:>3} " + " ".join(f"{c:>21}" for c in cells), flush=True)


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
