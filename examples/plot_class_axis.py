"""
The class axis: exact slots for few classes, cheap estimates for many
=====================================================================

A low-rank PEF stores, per example, a few gradient vectors ("class slots") whose outer
products sum to the Fisher ``F = J^T M J`` (``J`` the logits' Jacobian, ``M = diag(p) -
p p^T``). Each slot costs one backward pass. ``PEFTransformer(class_axis=...)`` chooses
them:

* ``"top"`` (default): one slot per class, the ``n_classes`` most probable (the paper's
  choice; exact with every class, biased when truncated);
* ``"eigen"``: the eigenvectors of ``M`` with the largest eigenvalues. ``M`` has rank
  ``C - 1``, so ``n_classes=None`` gives *exactly* ``F`` with ``C - 1`` slots (one for a
  binary softmax); fewer slots give the optimal truncation of ``M``;
* ``"sample"``: ``n_classes`` labels drawn from the model, ``y ~ p(y|x)``;
* ``"project"``: ``n_classes`` Gaussian combinations of all classes' slots.

The last two are unbiased estimates of ``F`` (arXiv 2310.04649, revision: large output
spaces). This example checks the exact case on a 3-class model, then compares the four on
a model with 100 classes: the error of ``F`` and the components NPEFF finds.
"""

# %%
# Few classes: the same Fisher with one slot fewer
# ------------------------------------------------
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from sknpeff.datasets import make_gated_experts
from sknpeff.decomposition import DiagonalNPEFF
from sknpeff.inspection import pseudo_fisher_cosines
from sknpeff.pef import PEFTransformer

torch.manual_seed(0)
small = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
X_small = torch.randn(50, 6, dtype=torch.float64)


def slots(model, X, **kw):
    """Unnormalized, unsparsified slot vectors, shape (n_examples, n_slots, n_params)."""
    pt = PEFTransformer(model, kind="low_rank", n_values=10**9, normalize=False,
                        dtype="float64", **kw).fit(X)
    return pt.transform(X).toarray().reshape(len(X), pt.n_classes_, pt.n_params_)


A_top, A_eig = slots(small, X_small), slots(small, X_small, class_axis="eigen")
F_top = np.einsum("ncm,ncq->nmq", A_top, A_top)
F_eig = np.einsum("ncm,ncq->nmq", A_eig, A_eig)
print(f"top: {A_top.shape[1]} slots, eigen: {A_eig.shape[1]} slots; largest difference "
      f"of the Fishers: {np.abs(F_top - F_eig).max() / np.abs(F_top).max():.1e} of their "
      "largest entry")

# %%
# Many classes: planted experts with 100 outputs
# -----------------------------------------------
# Comparing NPEFF components is meaningful only if the fit on the exact PEFs finds the
# same components every time. :func:`~sknpeff.datasets.make_gated_experts` builds a
# classifier whose components are planted: 8 experts with their own parameters, each
# example switching on one of them, so its Fisher lies in that expert's parameters (and
# the shared output bias). Its random weights spread the predictions over many of the
# 100 classes.
E, C = 8, 100
model, sample, _ = make_gated_experts(n_experts=E, n_noise=4, n_classes=C, hidden=4,
                                      concepts_per_example=(1, 1), random_state=0)
model = model.double()
X, _ = sample(120, random_state=1)
X_other, _ = sample(120, random_state=2)
X, X_other = X.double(), X_other.double()
with torch.no_grad():
    p = torch.softmax(model(X), 1).sort(1, descending=True).values
print(f"{sum(q.numel() for q in model.parameters())} parameters; mean top-1 probability "
      f"{float(p[:, 0].mean()):.2f}, mean mass of the top 16: "
      f"{float(p[:, :16].sum(1).mean()):.2f}")

# %%
# The exact Fisher, for reference
# -------------------------------
# Per example, from the logits' Jacobian (``torch.func``) and ``M``: the error of an
# estimate ``A^T A`` is computed from small matrices only (``C x C`` and ``s x s``),
# never forming ``F`` (``m x m``).
params = {k: v.detach() for k, v in model.named_parameters()}
jac = torch.func.vmap(torch.func.jacrev(
    lambda ps, x: torch.func.functional_call(model, ps, (x[None],))[0]), in_dims=(None, 0))(
    params, X)
J = torch.cat([jac[k].reshape(len(X), C, -1) for k in params], 2).numpy()
with torch.no_grad():
    prob = torch.softmax(model(X), 1).numpy()
M = np.einsum("nc,cd->ncd", prob, np.eye(C)) - prob[:, :, None] * prob[:, None, :]
MK = M @ (J @ J.transpose(0, 2, 1))
norm2_F = np.einsum("nij,nji->n", MK, MK)  # ||J^T M J||_F^2 = tr(M K M K), K = J J^T


def relative_error(A, rows=slice(None)):
    """Mean over examples (``rows`` of ``X``) of ||A^T A - F||_F / ||F||_F."""
    P = J[rows] @ A.transpose(0, 2, 1)
    cross = np.einsum("ncs,ncd,nds->n", P, M[rows], P, optimize=True)  # <A^T A, F>
    norm2_A = ((A @ A.transpose(0, 2, 1)) ** 2).sum((1, 2))
    norm2 = norm2_A + norm2_F[rows] - 2 * cross
    return float(np.mean(np.sqrt(np.maximum(norm2, 0) / norm2_F[rows])))


# every slot on the first 20 examples: exact up to rounding (the square root of a
# difference of float64 squares: about 1e-8)
print(f"eigen, all {C - 1} slots: relative error of F "
      f"{relative_error(slots(model, X[:20], class_axis='eigen'), slice(20)):.1e}")


# %%
# Error of F and NPEFF components against the exact-class fit
# -----------------------------------------------------------
# Components: :class:`~sknpeff.decomposition.DiagonalNPEFF` (one per expert, 1024 stored
# values per PEF) on each set of PEFs, matched to the fit on the exact PEFs
# (``class_axis="eigen"``, 99 slots) by their cosines
# (:func:`~sknpeff.inspection.pseudo_fisher_cosines`) and an optimal assignment. The
# noise floor: the exact fit from another seed, and on other examples.
def components(X, seed=0, **kw):
    pt = PEFTransformer(model, kind="diagonal", n_values=1024, **kw).fit(X)
    est = DiagonalNPEFF(n_components=E, max_iter=100, tol=0.0, random_state=seed)
    return est.fit(pt.transform(X)).components_


def matched_cos(a, b):
    S = pseudo_fisher_cosines(np.vstack([a, b]), kind="diagonal")[:len(a), len(a):]
    rows, cols = linear_sum_assignment(-S)
    return float(S[rows, cols].mean())


t0 = time.perf_counter()
reference = components(X, class_axis="eigen")
floor_seed = matched_cos(reference, components(X, seed=1, class_axis="eigen"))
floor_examples = matched_cos(reference, components(X_other, class_axis="eigen"))
axes, sizes = ("top", "eigen", "sample", "project"), (1, 4, 16)
error = {a: [] for a in axes}
similarity = {a: [] for a in axes}
for s in sizes:
    for axis in axes:
        kw = dict(class_axis=axis, n_classes=s, random_state=0)
        error[axis].append(relative_error(slots(model, X, **kw)))
        similarity[axis].append(matched_cos(reference, components(X, **kw)))
print(f"(computed in {time.perf_counter() - t0:.1f} s)")
print(f"noise floor: exact, other seed: {floor_seed:.3f}; exact, other examples: "
      f"{floor_examples:.3f}")
print("relative Frobenius error of F | matched cosine of components with the exact fit")
print(f"{'s':>3} " + " ".join(f"{a:>15}" for a in axes))
for i, s in enumerate(sizes):
    print(f"{s:>3} " + " ".join(f"{error[a][i]:6.3f} | {similarity[a][i]:5.3f}" for a in axes))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
for axis in axes:
    ax0.plot(sizes, error[axis], "o-", label=axis)
    ax1.plot(sizes, similarity[axis], "o-", label=axis)
ax1.axhline(floor_seed, color="gray", ls="--", lw=1, label="exact, other seed")
ax1.axhline(floor_examples, color="gray", ls=":", lw=1, label="exact, other examples")
ax0.set(xscale="log", xlabel="slots per example (backward passes)",
        ylabel="relative error of F")
ax1.set(xscale="log", xlabel="slots per example", ylabel="matched cosine with exact fit")
ax0.set_xticks(sizes, [str(s) for s in sizes])
ax1.set_xticks(sizes, [str(s) for s in sizes])
ax0.legend()
ax1.legend(loc="lower right")
fig.tight_layout()
plt.show()

# %%
# When to use which
# -----------------
# With few classes, ``"eigen"`` is exact and saves a slot (half the work for a binary
# softmax). With many classes, ``"eigen"`` has the smallest error of each example's
# ``F`` for a given number of slots (the optimal truncation of ``M``; ``"top"`` is close),
# but that error is a bias, the same on every example: with one slot, the components
# NPEFF finds from ``"top"`` or ``"eigen"`` PEFs are far from the exact ones. ``"sample"``
# and ``"project"`` are unbiased: each example's ``F`` is noisier (errors above 1 with
# one slot), but NPEFF averages that noise over the examples that share a component, and
# their components are closer to the exact ones at small ``s`` (``"project"`` most). With
# 16 slots every option is within 0.01 of the exact fit: closer than the exact fit on
# another draw of 120 examples.
