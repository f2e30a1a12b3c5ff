"""
Component expansion on misclassified examples
=============================================

A decomposition fitted on all examples spends its components on the model's general
processing: the common ways of recognising each digit. The paper (section 3.5) then
learns *new* components on a specialised set -- the misclassified examples -- while the
old ones stay frozen. The frozen components keep explaining what the errors share with
everything else, so the new ones specialise to what is particular about the errors.
:class:`~sknpeff.expansion.ComponentExpander` does exactly that.

To have enough errors to learn from, this example trains the digits CNN for only 3
epochs (about 95% held-out accuracy).
"""

# %%
# A model that makes mistakes, and its PEFs
# -----------------------------------------
import matplotlib.pyplot as plt
import numpy as np

from sknpeff.datasets import train_digits_cnn
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.expansion import ComponentExpander
from sknpeff.inspection import plot_top_examples, top_examples
from sknpeff.pef import PEFTransformer

model, split = train_digits_cnn(random_state=0, epochs=3)
y_train, y_test = split.y_train.numpy(), split.y_test.numpy()
pef = PEFTransformer(model, kind="low_rank", n_values=2048, batch_size=128).fit(split.X_train)
res_train, res_test = pef.compute(split.X_train), pef.compute(split.X_test)
wrong_train = res_train.predictions != y_train
wrong_test = res_test.predictions != y_test
print(f"held-out accuracy {split.test_accuracy:.3f}; misclassified: {wrong_train.sum()} "
      f"training and {wrong_test.sum()} held-out examples")

# %%
# General components, then new ones on the errors
# -----------------------------------------------
# 16 components on all training examples; then 4 new ones learned on the misclassified
# training examples only, the 16 frozen (kept bit for bit).
base = LowRankNPEFF(n_components=16, n_classes=10, random_state=0).fit(res_train.pefs)
expander = ComponentExpander(base, n_new_components=4, random_state=0)
expander.fit(res_train.pefs[wrong_train])
assert np.array_equal(expander.components_[:16], base.components_)
print("components:", expander.components_.shape, "frozen:", int(expander.frozen_.sum()))

# %%
# Do the new components pick out held-out errors?
# -----------------------------------------------
# Coefficients of the held-out examples over all 20 components; for each component, the
# fraction of its 10 top held-out examples that the model gets wrong (the base rate is the
# held-out error rate).
W_test = expander.transform(res_test.pefs)
top = top_examples(W_test, k=10)
error_rate = wrong_test[top].mean(axis=1)
print(f"held-out error rate: {wrong_test.mean():.3f}")
print(f"errors among the top 10 of the frozen components: {error_rate[:16].mean():.2f}")
print(f"errors among the top 10 of the new components   : {error_rate[16:].mean():.2f}")

# %%
# And how much better are the errors explained? The loss (squared Frobenius residual) of
# the held-out misclassified examples' PEFs, before and after the expansion.
loss_before = base.loss(res_test.pefs[wrong_test])
loss_after = expander.estimator_.loss(res_test.pefs[wrong_test])
print(f"loss on held-out errors: {loss_before:.3f} with 16 components, "
      f"{loss_after:.3f} with the 4 new ones added")

# %%
fig, ax = plt.subplots(figsize=(8, 3))
colors = ["tab:gray"] * 16 + ["tab:red"] * 4
ax.bar(np.arange(20), error_rate, color=colors)
ax.axhline(wrong_test.mean(), color="black", lw=1, ls="--", label="held-out error rate")
ax.set_xlabel("component (red: learned on the misclassified examples)")
ax.set_ylabel("errors among top 10")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# The top held-out examples of the new component that collects the most errors (``y``:
# label, ``p``: prediction).
best_new = 16 + int(np.argmax(error_rate[16:]))
fig = plot_top_examples(split.X_test[:, 0].numpy(), W_test, component=best_new, k=8,
                        labels=y_test, predictions=res_test.predictions, ncols=8)
plt.show()
