"""Baselines NPEFF is compared against, as scikit-learn transformers.

Each fits on examples of a PyTorch model (passed to the constructor, as to
:class:`~sknpeff.pef.PEFTransformer`) and returns an ``(n_examples, n_components)``
non-negative coefficient matrix, so :mod:`sknpeff.inspection` reads it like NPEFF's ``W``:

* :class:`GradientClustering` -- spectral (or k-means) clustering of per-example gradients
  of one log-probability (Michaud et al., 2023, "The Quantization Model of Neural
  Scaling");
* :class:`ActivationKMeans` -- k-means of a layer's activations, examples ranked by distance
  to the centroid (Matena & Raffel, arXiv 2310.04649, §3.4);
* :class:`ActivationSAE` -- a standard ReLU sparse autoencoder of a layer's activations,
  its latents as coefficients (the TMLR revision's activation baseline).

A clustering gives each example one cluster, so it cannot give an example two factors;
:func:`sknpeff.inspection.multi_factor_recall` measures exactly that.
"""

from ._activation_kmeans import ActivationKMeans
from ._gradient_clustering import GradientClustering, angular_affinity
from ._sae import ActivationSAE

__all__ = [
    "ActivationKMeans",
    "ActivationSAE",
    "GradientClustering",
    "angular_affinity",
]
