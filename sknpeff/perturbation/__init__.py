"""Guided perturbations: check that a component is part of the model's processing.

For an NPEFF component ``j``, :class:`GuidedPerturber` builds a parameter perturbation
``delta`` that the component's pseudo-Fisher says should change the predictions of the
component's top examples much more than those of other examples (Matena & Raffel,
arXiv 2310.04649):

* **Low rank** (:class:`~sknpeff.decomposition.LowRankNPEFF`): since
  ``delta^T H_k delta = (g_k . delta)^2``, ``delta`` is ``+-g_j`` with its part in the span
  of the *other* components that are not similar to ``g_j`` (``|cos| < max_cosine``)
  removed by an exact orthogonal projection (pseudo-inverse of their Gram matrix), scaled to
  ``||delta|| = magnitude``.
* **Diagonal** (:class:`~sknpeff.decomposition.DiagonalNPEFF`): per parameter, the
  original value ``theta`` and a pushed value ``p = theta - s Delta sign(grad)`` (``grad``
  the gradient of the loss summed over the component's top examples) are blended with
  Fisher weights, ``theta' = (w1 theta + w2 p) / (w1 + w2)``,
  ``w1 = (1 - lambda) max(F_dataset, floor)``, ``w2 = lambda h_j`` (both Fishers
  unit-normalized). ``Delta`` (log scale) and ``lambda`` in ``(0.035, 0.965)`` are searched
  until the mean KL on the top examples falls in ``kl_target``. Where the paper's code drew
  ``(Delta, lambda)`` at random (log-uniform), this searches deterministically: ``lambda``
  on ``n_lambda`` points evenly spaced in log-odds, and for each ``Delta`` by bisection on
  its log over ``[1e-6, 1e2]`` (the top KL grows with ``Delta``), keeping the ``lambda``
  whose perturbation is most selective on a held-apart selection set. ``sign=+1`` pushes
  against the gradient of the loss of the top examples (labels, or the model's own
  predictions), ``sign=-1`` along it.

The selectivity of a component is its **KL ratio**: mean KL divergence between the
original and perturbed predictive distributions over the component's top examples,
divided by the mean over a random baseline set (best of both signs). It is reported beside
the **PEF-norm ratio** of the same two sets (paper fig. 3): a KL ratio is only evidence
when it clearly exceeds the norm ratio, and a component whose top examples have ~0 Fisher
norm (predicted with probability ~1) has a KL ratio ~0 whatever ``delta`` is.
"""

from ._perturber import GuidedPerturber
from ._results import KLRatioResult, KLRatioResults

__all__ = ["GuidedPerturber", "KLRatioResult", "KLRatioResults"]
