"""
NPEFF against its baselines on multi-factor behaviour
=====================================================

The TMLR revision of NPEFF (Matena & Raffel, arXiv 2310.04649) claims that NPEFF excels
at decomposing behaviours made of *several* factors, compared with gradient clustering
and activation sparse autoencoders. Here the factors are known:
:func:`~sknpeff.datasets.make_gated_experts` with ``concepts_per_example=(1, 3)`` gives
examples that each switch on one to three of six experts (small MLPs with their own
parameters). Every method gets the same number of components:

* :class:`~sknpeff.decomposition.DiagonalNPEFF` and
  :class:`~sknpeff.decomposition.LowRankNPEFF` on the model's diagonal and low-rank PEFs;
* :class:`~sknpeff.baselines.GradientClustering`: spectral clustering of per-example
  gradients of the predicted label's log-probability (Michaud et al., 2023);
* :class:`~sknpeff.baselines.ActivationKMeans`: k-means of the experts' gated hidden
  activations (the layer ``gated_hidden``), the paper's clustering baseline;
* :class:`~sknpeff.baselines.ActivationSAE`: a ReLU sparse autoencoder of the same
  activations.

Each gives a non-negative coefficient matrix on held-out examples, read by the same two
statistics of :mod:`sknpeff.inspection`: :func:`~sknpeff.inspection.concept_purity` (do a
component's top examples share one expert?) and
:func:`~sknpeff.inspection.multi_factor_recall` (does an example of two or three experts
have all of them among its two or three strongest components?), each beside its chance
level.
"""

# %%
# The model, its examples and the methods
# ---------------------------------------
# One seed here; ``benchmarks/bench_baselines.py`` repeats this over three seeds.
import matplotlib.pyplot as plt
import numpy as np

from sknpeff.baselines import ActivationKMeans, ActivationSAE, GradientClustering
from sknpeff.datasets import make_gated_experts
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from sknpeff.inspection import concept_purity, multi_factor_recall
from sknpeff.pef import PEFTransformer

model, sample, _ = make_gated_experts(concepts_per_example=(1, 3), random_state=0)
X_train, _ = sample(1000, random_state=1)
X_test, concepts = sample(400, random_state=2)
k = 8
print("examples by number of experts used:", np.bincount(concepts.sum(1))[1:])

W = {}
for kind, NPEFF in [("diagonal", DiagonalNPEFF), ("low_rank", LowRankNPEFF)]:
    pef = PEFTransformer(model, kind=kind, n_values=400).fit(X_train)
    extra = {"n_classes": pef.n_classes_} if kind == "low_rank" else {}
    npeff = NPEFF(n_components=k, random_state=0, **extra).fit(pef.transform(X_train))
    W[NPEFF.__name__] = npeff.transform(pef.transform(X_test))

baselines = {
    "GradientClustering": GradientClustering(model, n_components=k, random_state=0),
    "ActivationKMeans": ActivationKMeans(model, "gated_hidden", n_components=k,
                                         random_state=0),
    "ActivationSAE": ActivationSAE(model, "gated_hidden", n_components=k, max_iter=100,
                                   random_state=0),
}
for name, est in baselines.items():
    W[name] = est.fit(X_train).transform(X_test)

# %%
# Purity and multi-factor recall
# ------------------------------
results = {name: (concept_purity(w, concepts), multi_factor_recall(w, concepts))
           for name, w in W.items()}
for name, (pur, mfr) in results.items():
    print(f"{name:>18}: purity {pur.purity:.2f} (chance {pur.random_purity:.2f}), "
          f"multi-factor recall {mfr.recall:.2f} (chance {mfr.random_recall:.2f}), "
          f"all experts found {mfr.all_recovered:.2f}")

# %%
# Clusterings give each example one cluster, so an example of two or three experts has
# at most one of them among its strongest components: their recall is about one over
# the number of experts, at or below the chance level of random component sets. Their top
# examples can still be pure. NPEFF's coefficients are additive, so one component per
# expert can be active on the same example; the sparse autoencoder's latents are
# additive too and sit in between.
names = list(results)
x = np.arange(len(names))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, (i, label) in zip(axes, [(0, "concept purity (top 16)"),
                                 (1, "multi-factor recall")], strict=True):
    values = [results[n][i].purity if i == 0 else results[n][i].recall for n in names]
    chance = [results[n][i].random_purity if i == 0 else results[n][i].random_recall
              for n in names]
    ax.bar(x, values, color=[f"C{j}" for j in range(len(names))])
    ax.scatter(x, chance, color="k", marker="_", s=400, label="chance")
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(label)
axes[1].legend(fontsize=8)
fig.tight_layout()

# %%
# One example of three experts, its coefficients under each method (each column scaled
# to its largest value on the held-out examples), and the expert each component's top
# examples share most.
i = int(np.flatnonzero(concepts.sum(1) == 3)[0])
print("experts of the example:", np.flatnonzero(concepts[i]).tolist())
fig, axes = plt.subplots(1, len(names), figsize=(11, 2.4), sharey=True)
for ax, name in zip(axes, names, strict=True):
    w = W[name][i] / np.maximum(W[name].max(0), 1e-12)
    labels = results[name][1].component_concepts
    ax.bar(np.arange(k), w, color=["C2" if concepts[i, c] else "0.6" for c in labels])
    ax.set_xticks(np.arange(k), [f"e{c}" for c in labels], fontsize=7)
    ax.set_title(name, fontsize=9)
axes[0].set_ylabel("scaled coefficient")
fig.suptitle("green: components labelled with one of the example's experts", fontsize=9)
fig.tight_layout()
plt.show()
