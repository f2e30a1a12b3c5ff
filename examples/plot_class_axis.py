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

from sknpeff.decomposition import LowRankNPEFF
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
# Many classes: a small MLP with 100 classes
# ------------------------------------------
# Trained for a few seconds on overlapping Gaussian blobs, with label smoothing so that
# its predictions spread over several classes.
C, dim = 100, 12
g = torch.Generator().manual_seed(0)
centers = torch.randn(C, dim, generator=g)
y = torch.randint(C, (2000,), generator=g)
X = centers[y] + 0.7 * torch.randn(2000, dim, generator=g)
model = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, C))
opt = torch.optim.Adam(model.parameters(), lr=0.03)
for _ in range(100):
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y, label_smoothing=0.1).backward()
    opt.step()
model = model.double().eval()
X = X[:60].double()
with torch.no_grad():
    p = torch.softmax(model(X), 1).sort(1, descending=True).values
print(f"{sum(q.numel() for q in model.parameters())} parameters; mean top-1 probability "
      f"{float(p[:, 0].mean()):.2f}, mean mass of the top 4: {float(p[:, :4].sum(1).mean()):.2f}")

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
MK = M @ np.einsum("ncm,ndm->ncd", J, J)
norm2_F = np.einsum("nij,nji->n", MK, MK)  # ||J^T M J||_F^2 = tr(M K M K), K = J J^T


def relative_error(A):
    """Mean over examples of ||A^T A - F||_F / ||F||_F."""
    P = np.einsum("ncm,nsm->ncs", J, A)
    cross = np.einsum("ncs,ncd,nds->n", P, M, P)  # <A^T A, F>
    norm2_A = (np.einsum("ncm,ndm->ncd", A, A) ** 2).sum((1, 2))
    return float(np.mean(np.sqrt(np.maximum(norm2_A + norm2_F - 2 * cross, 0) / norm2_F)))


# %%
# Error of F and NPEFF components against the exact-class fit
# -----------------------------------------------------------
# Components: ``LowRankNPEFF`` (6 components, 512 stored values per PEF) from the same
# random initialization on each set of PEFs, matched to the fit on the exact PEFs
# (``class_axis="eigen"``, 99 slots) by their mean absolute cosine.
def components(seed=0, **kw):
    pt = PEFTransformer(model, kind="low_rank", n_values=512, **kw).fit(X)
    est = LowRankNPEFF(n_components=6, n_classes=pt.n_classes_, init="random",
                       max_iter=60, tol=0.0, random_state=seed)
    return est.fit(pt.transform(X)).components_


def matched_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    S = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(-S)
    return float(S[rows, cols].mean())


t0 = time.perf_counter()
reference = components(class_axis="eigen")
# the noise floor: the exact PEFs again, from another initialization
floor = matched_cos(reference, components(seed=1, class_axis="eigen"))
axes, sizes = ("top", "eigen", "sample", "project"), (1, 4, 16)
error = {a: [] for a in axes}
similarity = {a: [] for a in axes}
for s in sizes:
    for axis in axes:
        error[axis].append(relative_error(
            slots(model, X, class_axis=axis, n_classes=s, random_state=0)))
        similarity[axis].append(matched_cos(
            reference, components(class_axis=axis, n_classes=s, random_state=0)))
print(f"(computed in {time.perf_counter() - t0:.1f} s)")
print("relative Frobenius error of F | matched |cos| of components with the exact fit "
      f"(exact fit from another initialization: {floor:.3f})")
print(f"{'s':>3} " + " ".join(f"{a:>15}" for a in axes))
for i, s in enumerate(sizes):
    print(f"{s:>3} " + " ".join(f"{error[a][i]:6.3f} | {similarity[a][i]:5.3f}" for a in axes))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.5))
for axis in axes:
    ax0.plot(sizes, error[axis], "o-", label=axis)
    ax1.plot(sizes, similarity[axis], "o-", label=axis)
ax1.axhline(floor, color="gray", ls="--", lw=1, label="exact, other init")
ax0.set(xscale="log", yscale="log", xlabel="slots per example (backward passes)",
        ylabel="relative error of F")
ax1.set(xscale="log", xlabel="slots per example", ylabel="matched |cos| with exact fit")
ax0.set_xticks(sizes, [str(s) for s in sizes])
ax1.set_xticks(sizes, [str(s) for s in sizes])
ax0.legend()
fig.tight_layout()
plt.show()

# %%
# When to use which
# -----------------
# With few classes, ``"eigen"`` is exact and saves a slot (half the work for a binary
# softmax). With many classes and peaked predictions, ``"eigen"`` and ``"top"`` capture
# most of ``F`` with a handful of slots (``"eigen"`` a little more, as the optimal
# truncation); their error does not vanish, it is a bias. ``"sample"`` and ``"project"``
# are unbiased, but their error falls only like ``1 / sqrt(s)``: they pay off when the
# probability mass is spread over many classes (a language model's vocabulary) or when
# an unbiased average over many examples matters more than each example's PEF.
