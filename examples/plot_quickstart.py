"""
Quick start: NPEFF of a small digits CNN in a scikit-learn pipeline
===================================================================

This example trains the tiny convolutional network bundled with :mod:`sknpeff.datasets`
on scikit-learn's 8x8 digits, then decomposes its per-example Fishers with a two-step
:class:`~sklearn.pipeline.Pipeline`:

1. :class:`~sknpeff.pef.PEFTransformer` turns every example into its exact low-rank
   per-example Fisher (one sparse row per example: ten class slots of gradient vectors,
   keeping the 2048 largest entries);
2. :class:`~sknpeff.decomposition.LowRankNPEFF` decomposes that collection into a few
   non-negative components.

The pipeline's ``transform`` gives the coefficients of new (held-out) examples with the
components frozen, and :func:`~sknpeff.inspection.component_summary` tells what each
component's top examples have in common.
"""

# %%
# Train the model
# ---------------
# ``train_digits_cnn`` is seeded and takes a couple of seconds on one CPU core. As in
# ``python -m sknpeff demo``, the model is trained with label smoothing 0.1: trained
# without it, it is near-certain on most digits, their Fishers are almost zero, and the
# components they take are pure but cannot be perturbed (see :ref:`reading-components`).
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.pipeline import make_pipeline

from sknpeff.datasets import train_digits_cnn
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.inspection import component_summary, plot_top_examples
from sknpeff.pef import PEFTransformer

model, split = train_digits_cnn(random_state=0, label_smoothing=0.1)
n_params = sum(p.numel() for p in model.parameters())
print(f"{n_params} parameters, held-out accuracy {split.test_accuracy:.3f}")

# %%
# Fit the pipeline
# ----------------
# ``n_classes=10`` tells the decomposition how many class slots each PEF row holds; it must
# match the transformer's (all ten outputs by default). ``n_values=2048`` keeps the 2048
# largest of the 10 x 3818 entries of each example's PEF.
pipe = make_pipeline(
    PEFTransformer(model, kind="low_rank", n_values=2048, batch_size=128),
    LowRankNPEFF(n_components=16, n_classes=10, random_state=0),
)
W_train = pipe.fit_transform(split.X_train)
W_test = pipe.transform(split.X_test)
print("train coefficients:", W_train.shape, " held-out coefficients:", W_test.shape)

# %%
# What do the components' top examples share?
# -------------------------------------------
# Each component's 16 held-out examples with the largest coefficients, summarised by the
# most frequent label and prediction among them and how pure they are.
y_test = split.y_test.numpy()
with torch.no_grad():
    predictions = model(split.X_test).argmax(1).numpy()
summary = component_summary(W_test, labels=y_test, predictions=predictions, k=16)
for j in range(W_test.shape[1]):
    print(
        f"component {j:2d}: mostly predicted {summary['prediction_mode'][j]} "
        f"(purity {summary['prediction_purity'][j]:.2f}), "
        f"label purity {summary['label_purity'][j]:.2f}"
    )
print(f"mean top-16 prediction purity: {summary['prediction_purity'].mean():.2f}")

# %%
# Look at one component
# ---------------------
# The component with the purest top examples, drawn with their labels (``y``) and
# predictions (``p``).
best = int(np.argmax(summary["prediction_purity"]))
fig = plot_top_examples(
    split.X_test[:, 0].numpy(), W_test, component=best, k=16,
    labels=y_test, predictions=predictions,
)
plt.show()
