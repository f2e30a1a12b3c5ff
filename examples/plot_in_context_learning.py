"""
NPEFF on in-context learning
============================

A language model can answer from its context (copy a value seen earlier in the
sequence: in-context recall, the job of induction heads) or from its weights (a fact
memorized in training). Do NPEFF components tell these mechanisms apart, and does
perturbing the model along a "recall" component hurt recall selectively?

:func:`~sknpeff.datasets.make_icl_task` builds sequences ``k v k v k v M q``: three
key-value pairs, a marker and a query key. Which mechanism the answer (the next token)
needs is known by construction:

* **recall** (``Q`` and a key of the context): the value paired with it earlier in the
  sequence, random per sequence;
* **memorized** (``Q`` and a memorized key ``m*``, never in the context): a fixed table
  learned in training;
* **mixed** (``F`` and a key of the context): the recalled value mapped through a fixed
  permutation: both mechanisms.

A two-layer causal transformer (:class:`~sknpeff.datasets.TinyCausalLM`) learns all
three in a few seconds on a CPU. We compute the PEFs of its next-token distribution at
the last position (``position="last"``), decompose them, and compare the components'
top examples with the known mechanism.
"""

# %%
# The task and the model
# ----------------------
import matplotlib.pyplot as plt
import numpy as np
import torch

from sknpeff.datasets import MECHANISMS, make_icl_task, train_icl_model
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.pef import PEFTransformer
from sknpeff.perturbation import GuidedPerturber

model, info = train_icl_model(random_state=0)
print("held-out accuracy:", {m: round(a, 3) for m, a in info.accuracy.items()})
task = dict(n_pairs=info.n_pairs, n_keys=info.n_keys, n_values=info.n_values,
            table_seed=info.table_seed)
train = make_icl_task(1000, random_state=1, **task)
test = make_icl_task(600, random_state=2, **task)
for seq, ans, mech in zip(test.input_ids[:3].tolist(), test.answer[:3], test.mechanism[:3],
                          strict=True):
    print(f"{' '.join(test.tokens[t] for t in seq):28s} -> {test.tokens[ans]}  ({mech})")

# %%
# PEFs at the last position, and components
# -----------------------------------------
# The model returns logits for every position, ``(batch, seq_len, vocab)``;
# ``position="last"`` explains the next-token prediction after the query. The PEFs
# cover the transformer blocks (attention and MLPs): the token embeddings and the
# unembedding are used by every example alike and say which tokens are involved rather
# than how the answer is computed. The answers are among few tokens, so four class
# slots hold nearly all of each Fisher.
blocks = lambda name, p: name.startswith("blocks")  # noqa: E731
pef = PEFTransformer(model, kind="low_rank", n_values=2048, n_classes=4, position="last",
                     params=blocks, batch_size=200).fit(train.input_ids)
res_train, res_test = pef.compute(train.input_ids), pef.compute(test.input_ids)
est = LowRankNPEFF(n_components=12, n_classes=4, max_iter=60, random_state=0)
est.fit(res_train.pefs)
W = est.transform(res_test.pefs)  # held-out coefficients

# %%
# Top examples against the known mechanism
# ----------------------------------------
# For every component, the mechanisms of its 20 held-out examples with the largest
# coefficients. The purity is the share of the most common one.
n_top = 20
counts = np.array([np.bincount(test.label[np.argsort(-W[:, j])[:n_top]], minlength=3)
                   for j in range(W.shape[1])])
mechanism_of = counts.argmax(1)
purity = counts.max(1) / n_top
for j in range(W.shape[1]):
    print(f"component {j}: {MECHANISMS[mechanism_of[j]]:9s} purity {purity[j]:.2f} "
          f"({dict(zip(MECHANISMS, counts[j].tolist(), strict=True))})")
print(f"mean top-example purity: {purity.mean():.3f}")

fig, ax = plt.subplots(figsize=(7, 3))
bottom = np.zeros(len(counts))
for m, name in enumerate(MECHANISMS):
    ax.bar(np.arange(len(counts)), counts[:, m], bottom=bottom, label=name)
    bottom += counts[:, m]
ax.set_xlabel("component")
ax.set_ylabel(f"top {n_top} held-out examples")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# Perturbing along a recall component
# -----------------------------------
# :class:`~sknpeff.perturbation.GuidedPerturber` moves the parameters along a
# component (norm 0.1) and measures the KL divergence of the next-token distribution:
# its KL ratio is the mean KL on the component's top examples over the mean KL on all
# held-out examples; the PEF-norm ratio is what a direction blind to the component
# would give. Selectivity by mechanism: the mean KL on recall examples over that on
# memorized ones, against random directions of the same norm. ``position="last"``
# compares the next-token distributions at the same position as the PEFs.
gp = GuidedPerturber(est, model, layout=pef.layout_, magnitude=0.1, position="last",
                     batch_size=600)
recall_comps = [j for j in range(W.shape[1]) if MECHANISMS[mechanism_of[j]] == "recall"]
results = gp.kl_ratios(test.input_ids, W, recall_comps, n_top=n_top, norms=res_test.norms,
                       random_state=0)
is_recall, is_memorized = test.mechanism == "recall", test.mechanism == "memorized"


def selectivity(kl):
    return kl[is_recall].mean() / kl[is_memorized].mean()


params = [p for n, p in model.named_parameters() if blocks(n, p)]


def kl_random(rng):
    """Per-example KL for a random direction of norm 0.1 over the same parameters."""
    with torch.no_grad():
        lp0 = torch.log_softmax(model(test.input_ids)[:, -1].double(), -1)
        saved = [p.detach().clone() for p in params]
        d = [torch.from_numpy(rng.standard_normal(tuple(p.shape))) for p in params]
        scale = 0.1 / float(torch.sqrt(sum((t ** 2).sum() for t in d)))
        for p, t in zip(params, d, strict=True):
            p.add_(scale * t.to(p.dtype))
        lp1 = torch.log_softmax(model(test.input_ids)[:, -1].double(), -1)
        for p, t in zip(params, saved, strict=True):
            p.copy_(t)  # restored exactly
    return (lp0.exp() * (lp0 - lp1)).sum(-1).clamp_min(0).numpy()


rng = np.random.default_rng(0)
random_sel = [selectivity(kl_random(rng)) for _ in range(5)]
for j, r in zip(recall_comps, results, strict=True):
    sel = selectivity(gp.kl_divergence(test.input_ids, j, r.sign))
    print(f"recall component {j}: KL ratio {r.kl_ratio:.2f} (PEF-norm ratio "
          f"{r.norm_ratio:.2f}); KL on recall / memorized examples {sel:.1f}")
print(f"median KL ratio of the recall components: "
      f"{np.median(results.kl_ratio):.2f}")
print(f"random directions: KL on recall / memorized examples, median "
      f"{np.median(random_sel):.2f}")

# %%
# The components in the HTML report
# ---------------------------------
# :func:`sknpeff.inspection.report` shows text examples as their tokens, the explained
# position highlighted (here the query key, after which the answer is predicted).
from sknpeff.inspection import report  # noqa: E402

path = report("icl-report/report.html", W=W, tokens=test.input_ids, decode=test.tokens,
              positions="last", labels=test.mechanism, k=8,
              title="NPEFF on in-context learning")
print("report written to", path)

# %%
# Across training seeds (``random_state`` 0, 1 and 2 of ``train_icl_model``, the rest of
# this script unchanged), the mean top-example purity was 0.967, 0.912 and 0.958, and
# the median KL ratio of the recall components 16.4, 16.0 and 12.1, each component's far
# above its PEF-norm ratio (1.1 to 3.3); along them, recall examples moved 19 to 380
# times more than memorized ones, against 2.8 to 4.9 times for random directions.
# Memorized examples take most components: each memorized key's value sits in its own
# weights, while recall is one procedure whatever the key, which is why 12 components
# are asked for three mechanisms.
