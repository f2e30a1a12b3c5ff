"""k-means on a layer's activations (the clustering baseline of arXiv 2310.04649, §3.4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..utils import InvalidParameterError, check_choice, check_int
from ._base import POOLS, ModelBaselineMixin, iter_layer_activations, pool_positions

__all__ = ["ActivationKMeans", "check_layers", "layer_features"]


def check_layers(layer) -> list[str]:
    """``layer`` (a module name or a list of them) as a non-empty list of names."""
    names = [layer] if isinstance(layer, str) else layer
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(n, str) for n in names)):
        raise InvalidParameterError(
            "layer must be a module name (as in model.named_modules()) or a non-empty list "
            f"of them; got {layer!r}."
        )
    return list(names)


def layer_features(est, X, layers: list[str], device: torch.device) -> np.ndarray:
    """``(n_examples, n_features)`` float64 activations of ``layers`` (each pooled over
    positions with ``est.pool``, then concatenated), for the model of ``est``."""
    chunks = []
    for outs in iter_layer_activations(est.model, X, layers, forward=est.forward,
                                       batch_size=est.batch_size, device=device):
        pooled = [pool_positions(a, est.pool).reshape(a.shape[0], -1) for a in outs]
        chunks.append(torch.cat(pooled, dim=1).double().cpu().numpy())
    Z = np.concatenate(chunks, axis=0)
    est._check_finite(Z, "the activations")
    return Z


class ActivationKMeans(ModelBaselineMixin, TransformerMixin, BaseEstimator):
    """k-means clustering of a layer's activations, as coefficients like NPEFF's.

    The baseline of Matena & Raffel (arXiv 2310.04649, §3.4): the activations of a named
    layer (recorded with a forward hook) are clustered by scikit-learn's
    :class:`~sklearn.cluster.KMeans`, and a cluster's examples are ranked by their
    distance to its centroid. :meth:`transform` returns an ``(n_examples, n_components)``
    non-negative matrix that inspection tools read like NPEFF's coefficients ``W``:
    ``W[i, j] = exp(-d_ij ** 2 / s)`` when example ``i`` belongs to cluster ``j``
    (nearest centroid) and 0 otherwise, where ``d_ij`` is the distance to centroid ``j``
    and ``s`` the mean squared distance of the training examples to their centroid. A
    cluster's top examples are then its members, nearest to the centroid first.

    Parameters
    ----------
    model : torch.nn.Module
        A model in eval mode. It is never modified (the hooks are removed after each
        pass).
    layer : str or list of str, default=""
        Name(s) of the module(s) whose outputs are clustered (as in
        ``model.named_modules()``; ``""`` is the model itself: its output, the logits);
        several are concatenated. Each must run once per forward pass.
    n_components : int, default=8
        Number of clusters.
    pool : {"mean", "max", "last"}, default="mean"
        How activations with position axes, ``(batch, positions, ..., features)`` (a
        sequence model's tokens), are reduced to one vector per example: the mean or the
        maximum over positions (padding included), or the last position (a causal
        model's next-token prediction). ``(batch, features)`` activations are used as
        they are.
    coefficients : {"hard", "soft"}, default="hard"
        ``"hard"``: only the example's own cluster gets a nonzero coefficient (above).
        ``"soft"``: ``W[i, j] = exp(-d_ij ** 2 / s)`` for every cluster.
    n_init : int, default=10
        k-means restarts (:class:`~sklearn.cluster.KMeans`).
    forward : callable, default=None
        ``forward(model, batch)`` for models with another signature (as in
        :class:`~sknpeff.pef.PEFTransformer`); its output is not used.
    batch_size : int, default=64
        Examples per forward pass.
    device : str or torch.device, default=None
        Must be the device of the model's parameters (``None``: that device).
    random_state : int, RandomState instance or None, default=None
        Seed of k-means.

    Attributes
    ----------
    kmeans_ : sklearn.cluster.KMeans
        The fitted clustering of the training activations.
    labels_ : ndarray of shape (n_examples,)
        Cluster of each training example.
    cluster_centers_ : ndarray of shape (n_components, n_features)
        Centroids in activation space.
    scale_ : float
        ``s``: mean squared distance of a training example to its centroid.
    n_features_in_ : int
        Number of input features, when ``X`` is a two-dimensional array.

    See Also
    --------
    GradientClustering, ActivationSAE

    Examples
    --------
    >>> import torch
    >>> from sknpeff.baselines import ActivationKMeans
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3)).eval()
    >>> X = torch.randn(40, 4)
    >>> km = ActivationKMeans(model, layer="1", n_components=3, random_state=0).fit(X)
    >>> W = km.transform(X)
    >>> W.shape, bool((W >= 0).all()), int((W > 0).sum(axis=1).max())
    ((40, 3), True, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | Sequence[str] = "",
        *,
        n_components: int = 8,
        pool: str = "mean",
        coefficients: str = "hard",
        n_init: int = 10,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        random_state=None,
    ):
        self.model = model
        self.layer = layer
        self.n_components = n_components
        self.pool = pool
        self.coefficients = coefficients
        self.n_init = n_init
        self.forward = forward
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    def _validate(self) -> tuple[list[str], torch.device]:
        layers = check_layers(self.layer)
        check_int(self.n_components, "n_components", low=1)
        check_choice(self.pool, "pool", POOLS)
        check_choice(self.coefficients, "coefficients", ("hard", "soft"))
        check_int(self.n_init, "n_init", low=1)
        return layers, self._check_model()

    def fit(self, X, y=None):
        """Cluster the activations of ``X``.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples, in any form :class:`~sknpeff.pef.PEFTransformer` reads.
        y : ignored

        Returns
        -------
        self : ActivationKMeans
        """
        layers, device = self._validate()
        X = self._check_examples(X, reset=True)
        Z = layer_features(self, X, layers, device)
        if Z.shape[0] < self.n_components:
            raise ValueError(
                f"n_samples={Z.shape[0]} should be >= n_components={self.n_components}: "
                "k-means needs at least one example per cluster."
            )
        km = KMeans(n_clusters=self.n_components, n_init=self.n_init,
                    random_state=self.random_state).fit(Z)
        self.kmeans_ = km
        self.labels_ = km.labels_
        self.cluster_centers_ = km.cluster_centers_
        # the mean squared distance to the own centroid sets the similarity's scale
        self.scale_ = max(float(km.inertia_) / Z.shape[0], np.finfo(np.float64).tiny)
        return self

    def transform(self, X) -> np.ndarray:
        """Cluster membership weighted by similarity to the centroid (non-negative).

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            ``exp(-d_ij ** 2 / scale_)`` for the nearest centroid ``j`` (every centroid
            with ``coefficients="soft"``), 0 elsewhere.
        """
        check_is_fitted(self, "kmeans_")
        layers, device = self._validate()
        X = self._check_examples(X, reset=False)
        Z = layer_features(self, X, layers, device)
        if Z.shape[1] != self.cluster_centers_.shape[1]:
            raise ValueError(
                f"the activations have {Z.shape[1]} features per example but "
                f"{self.cluster_centers_.shape[1]} at fit; has the model changed?"
            )
        d2 = self.kmeans_.transform(Z) ** 2
        # floored at the smallest positive float: a far member still has its cluster
        W = np.maximum(np.exp(-d2 / self.scale_), np.finfo(np.float64).tiny)
        if self.coefficients == "hard":
            W = np.where(np.arange(W.shape[1])[None, :] == d2.argmin(axis=1)[:, None], W, 0.0)
        return W
