"""
Planted ground truth: NPEFF vs clustering baselines
===================================================

:func:`~sknpeff.datasets.make_gated_experts` builds a classifier whose inputs carry six
binary concept bits; expert ``e`` (a small MLP with its own parameters) is switched on
exactly when bit ``e`` is set. Each bit is on with probability 0.3, so most examples use
*several* experts at once. Which experts an example uses is known, so we can measure how
well each method recovers them:

* **NPEFF**: :class:`~sknpeff.decomposition.LowRankNPEFF` on the low-rank PEFs;
* **k-means on activations**: the gated hidden activations of the experts (the layer
  feeding the output), examples ranked by distance to each centroid (the paper's
  baseline);
* **gradient clustering**: k-means on the per-example gradients of one log-probability
  (the predicted class's), randomly projected to 64 dimensions.

Each method gives a score matrix (examples by components: NPEFF coefficients; for a
clustering, the members of cluster ``j`` ranked first, nearest to the centroid first).
For every expert we take the component that detects its bit best, measured on held-out
examples by the ROC AUC of the component's scores and by the fraction of its 16 top
examples that carry the bit.
"""

# %%
# The model and its examples
# --------------------------
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score
from torch.func import functional_call, grad, vmap

from sknpeff.datasets import make_gated_experts
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.pef import PEFTransformer

model, sample, expert_params = make_gated_experts(random_state=0)
X_train, concepts_train = sample(1500, random_state=1)
X_test, concepts_test = sample(600, random_state=2)
n_experts = concepts_train.shape[1]
n_components = 8
print(f"{sum(p.numel() for p in model.parameters())} parameters, {n_experts} experts; "
      f"experts used per example: {concepts_train.sum(1).mean():.2f} on average")

# %%
# NPEFF
# -----
pef = PEFTransformer(model, kind="low_rank", n_values=400).fit(X_train)
npeff = LowRankNPEFF(n_components=n_components, n_classes=pef.n_classes_, random_state=0)
npeff.fit(pef.transform(X_train))
scores = {"NPEFF": npeff.transform(pef.transform(X_test))}

# %%
# k-means on activations
# ----------------------
# The input of the output layers: each expert's hidden activations times its gate bit.


def activations(X):
    with torch.no_grad():
        return torch.cat([torch.tanh(expert[0](X)) * X[:, e:e + 1]
                          for e, expert in enumerate(model.experts)], dim=1).numpy()


def cluster_scores(km, Z):
    """Members of cluster j first (nearest to the centroid first), then everyone else."""
    d = km.transform(Z)
    member = d.argmin(axis=1)[:, None] == np.arange(d.shape[1])[None, :]
    return np.where(member, -d, -d - 2 * d.max() - 1.0)


km_act = KMeans(n_clusters=n_components, n_init=10, random_state=0).fit(activations(X_train))
scores["k-means on activations"] = cluster_scores(km_act, activations(X_test))

# %%
# Gradient clustering
# -------------------
# Per-example gradients of the predicted class's log-probability (``torch.func``), flattened,
# projected by a fixed Gaussian matrix to 64 dimensions and scaled to unit norm.
params = {name: p.detach() for name, p in model.named_parameters()}


def log_prob(p, x, onehot):
    logits = functional_call(model, p, (x[None],))[0]
    return (torch.log_softmax(logits, dim=0) * onehot).sum()


def gradients(X):
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(model(X).argmax(1), model(X[:1]).shape[1])
    g = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, X, onehot.to(X.dtype))
    return torch.cat([g[name].reshape(len(X), -1) for name in params], dim=1).numpy()


rng = np.random.default_rng(0)
n_params = sum(p.numel() for p in params.values())
projection = rng.standard_normal((n_params, 64)) / np.sqrt(64)


def projected_gradients(X):
    z = gradients(X) @ projection
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


km_grad = KMeans(n_clusters=n_components, n_init=10, random_state=0)
km_grad.fit(projected_gradients(X_train))
scores["gradient clustering"] = cluster_scores(km_grad, projected_gradients(X_test))

# %%
# Which method recovers the experts?
# ----------------------------------
# For each expert: the best ROC AUC of any component's scores for detecting its bit, and
# the best fraction of a component's 16 top examples carrying the bit.


def recovery(S, concepts, k=16):
    auc = np.array([[roc_auc_score(concepts[:, e], S[:, j]) for j in range(S.shape[1])]
                    for e in range(concepts.shape[1])])
    top = np.argsort(-S, axis=0, kind="stable")[:k]  # (k, n_components)
    precision = np.array([concepts[top[:, j], e].mean() for e in range(concepts.shape[1])
                          for j in range(S.shape[1])]).reshape(concepts.shape[1], -1)
    return auc.max(axis=1), precision.max(axis=1)


table = {}
for method, S in scores.items():
    table[method] = recovery(S, concepts_test)
    auc, precision = table[method]
    print(f"{method:>24}: best AUC per expert {auc.mean():.3f} (min {auc.min():.3f}), "
          f"top-16 precision {precision.mean():.2f} (min {precision.min():.2f})")

# %%
# Clustering gives each example one cluster, but most examples here use two or more
# experts: no partition of them can line up with all six concepts. NPEFF's coefficients
# are additive (an example's Fisher is a sum over the components it uses), so one
# component per expert can be active on the same example.
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=False)
x = np.arange(n_experts)
width = 0.27
for i, (method, (auc, precision)) in enumerate(table.items()):
    axes[0].bar(x + (i - 1) * width, auc, width, label=method)
    axes[1].bar(x + (i - 1) * width, precision, width, label=method)
axes[0].set_ylim(0.4, 1.02)
axes[0].set_ylabel("best ROC AUC")
axes[1].set_ylabel("best top-16 precision")
for ax in axes:
    ax.set_xticks(x, [f"expert {e}" for e in x], fontsize=8)
axes[1].legend(fontsize=7)
fig.tight_layout()

# %%
# NPEFF's components also point at the right parameters: the share of each component's
# squared mass in each expert's parameter block.
layout = pef.layout_
share = np.zeros((n_components, n_experts))
for e, names in expert_params.items():
    for name in names:
        sl = layout.slice(name)
        share[:, e] += (npeff.components_[:, sl] ** 2).sum(axis=1)
fig, ax = plt.subplots(figsize=(5, 3.2))
im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis")
ax.set_xlabel("expert")
ax.set_ylabel("NPEFF component")
fig.colorbar(im, ax=ax, label="share of |g_k|^2")
fig.tight_layout()
plt.show()
