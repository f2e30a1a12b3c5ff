"""
Diagonal vs low-rank NPEFF on the same model
============================================

NPEFF comes in two flavours (see :doc:`/method`):

* **D-NPEFF** approximates each per-example Fisher by its diagonal ``f_i`` (one
  non-negative value per parameter) and factors the sparse matrix of diagonals with
  non-negative matrix factorization: :class:`~sknpeff.decomposition.DiagonalNPEFF` on
  ``PEFTransformer(kind="diagonal")``.
* **LRM-NPEFF** keeps each Fisher exactly, as ``c`` gradient vectors (one per class), and
  fits non-negative sums of rank-one pseudo-Fishers ``g_k g_k^T``:
  :class:`~sknpeff.decomposition.LowRankNPEFF` on ``PEFTransformer(kind="low_rank")``.

The diagonal throws away the correlations between parameters but is ``c`` times smaller
and non-negative, so it factors quickly. Here both are fitted to the same digits CNN with
the same number of components and stored values, and compared by the purity of their
components' top held-out examples, the selectivity of their guided perturbations (KL
ratio), and how similar their coefficient patterns are.
"""

# %%
# Model and PEFs of both kinds
# ----------------------------
import time

import matplotlib.pyplot as plt
import numpy as np

from sknpeff.datasets import train_digits_cnn
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from sknpeff.inspection import component_similarity, component_summary
from sknpeff.pef import PEFTransformer
from sknpeff.perturbation import GuidedPerturber

# label smoothing 0.1, as in ``python -m sknpeff demo``: no near-certain predictions, whose
# almost-zero Fishers would give components that no perturbation moves
model, split = train_digits_cnn(random_state=0, label_smoothing=0.1)
y_test = split.y_test.numpy()
n_components = 16
# a diagonal PEF has one value per parameter (3818), a low-rank one ten (one per class):
# keep about a quarter of the diagonal and 2048 of the 38180 low-rank values
n_values = {"diagonal": 1024, "low_rank": 2048}

pefs = {}
for kind in ("diagonal", "low_rank"):
    t0 = time.perf_counter()
    pt = PEFTransformer(model, kind=kind, n_values=n_values[kind], batch_size=128)
    pt.fit(split.X_train)
    pefs[kind] = (pt, pt.compute(split.X_train), pt.compute(split.X_test))
    res = pefs[kind][1]
    print(f"{kind:>9}: PEF matrix {res.pefs.shape}, {res.pefs.nnz} stored values, "
          f"{time.perf_counter() - t0:.1f} s")

# %%
# Fit both decompositions
# -----------------------
# Each gets the same number of components; coefficients are then fitted on the held-out
# examples with the components frozen (``transform``).
estimators = {
    "diagonal": DiagonalNPEFF(n_components=n_components, random_state=0),
    "low_rank": LowRankNPEFF(n_components=n_components, n_classes=10, random_state=0),
}
W_test, fit_seconds = {}, {}
for kind, est in estimators.items():
    pt, res_train, res_test = pefs[kind]
    t0 = time.perf_counter()
    est.fit(res_train.pefs)
    fit_seconds[kind] = time.perf_counter() - t0
    W_test[kind] = est.transform(res_test.pefs)
    print(f"{kind:>9}: fit in {fit_seconds[kind]:.1f} s ({est.n_iter_} iterations)")

# %%
# Purity and selectivity
# ----------------------
# For every component: the prediction purity of its 16 top held-out examples, and its KL
# ratio (mean KL divergence of the perturbed model on those 16 examples over the mean on
# all held-out examples, better sign). The low-rank perturbation is ``g_j`` projected away
# from the other components; the diagonal one is the Fisher-weighted blend searched until
# the top examples' KL reaches a target range (see :doc:`/method`).
results = {}
for kind, est in estimators.items():
    pt, _, res_test = pefs[kind]
    summary = component_summary(W_test[kind], labels=y_test,
                                predictions=res_test.predictions, k=16)
    gp = GuidedPerturber(est, model, layout=pt.layout_, batch_size=512)
    kl = gp.kl_ratios(split.X_test, W_test[kind], n_top=16, norms=res_test.norms,
                      random_state=0)
    results[kind] = (summary["prediction_purity"], np.nan_to_num(kl.kl_ratio), kl.norm_ratio)
    print(f"{kind:>9}: mean purity {summary['prediction_purity'].mean():.2f}, "
          f"median KL ratio {np.median(np.nan_to_num(kl.kl_ratio)):.2f}, "
          f"KL ratio > norm ratio for "
          f"{int(np.sum(np.nan_to_num(kl.kl_ratio) > kl.norm_ratio))}/{n_components}")

# %%
# Do the two find the same structure?
# -----------------------------------
# :func:`~sknpeff.inspection.component_similarity` averages, for every component of one
# run, its best cosine with a component of the other, over the coefficient vectors of the
# same held-out examples (1 = the same groups of examples).
sim, d_to_l, l_to_d = component_similarity(W_test["diagonal"], W_test["low_rank"],
                                           return_directed=True)
print(f"similarity {sim:.2f} (diagonal found in low rank {d_to_l:.2f}, "
      f"low rank found in diagonal {l_to_d:.2f})")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
for kind, color in (("diagonal", "tab:orange"), ("low_rank", "tab:blue")):
    purity, kl_ratio, norm_ratio = results[kind]
    axes[0].hist(purity, bins=np.linspace(0, 1, 11), alpha=0.6, color=color, label=kind)
    axes[1].scatter(norm_ratio, kl_ratio, color=color, label=kind, s=18)
axes[0].set_xlabel("top-16 prediction purity")
axes[0].set_ylabel("components")
lim = max(axes[1].get_xlim()[1], axes[1].get_ylim()[1])
axes[1].plot([0, lim], [0, lim], color="gray", lw=1, ls="--")
axes[1].set_xlabel("PEF-norm ratio")
axes[1].set_ylabel("KL ratio")
axes[1].set_title("above the dashed line: selective", fontsize=9)
for ax in axes:
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
