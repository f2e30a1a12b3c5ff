"""Gradient clustering (Michaud et al., 2023, "The Quantization Model of Neural Scaling")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.random_projection import SparseRandomProjection
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..layout import ParameterLayout
from ..utils import check_choice, check_int
from ._base import ModelBaselineMixin
from ._gradients import iter_log_prob_gradients

__all__ = ["GradientClustering", "angular_affinity"]


def angular_affinity(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``1 - arccos(cos(a_i, b_j)) / pi`` of the rows of two matrices of unit (or zero)
    rows: 1 for the same direction, 1/2 for orthogonal (or a zero row), 0 for opposite.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.baselines import angular_affinity
    >>> angular_affinity(np.eye(2), np.array([[1.0, 0.0], [-1.0, 0.0]])).round(2)
    array([[1. , 0. ],
           [0.5, 0.5]])
    """
    return 1.0 - np.arccos(np.clip(A @ B.T, -1.0, 1.0)) / np.pi


def _unit_rows(G: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(G, axis=1, keepdims=True)
    return np.divide(G, norms, out=np.zeros_like(G), where=norms > 0)


class GradientClustering(ModelBaselineMixin, TransformerMixin, BaseEstimator):
    """Clusters of per-example gradients, as coefficients like NPEFF's.

    The gradient clustering of Michaud et al. (2023, "The Quantization Model of Neural
    Scaling"), the baseline of the TMLR revision of Matena & Raffel (arXiv 2310.04649):
    each example is represented by the gradient of *one* log-probability (of the
    predicted or the true label) with respect to the model's parameters, scaled to unit
    norm and optionally randomly projected (a sparse random projection, then unit norm
    again); two examples' affinity is ``1 - arccos(cos) / pi``; the examples are then
    clustered by spectral clustering of that affinity matrix
    (:class:`~sklearn.cluster.SpectralClustering`, ``affinity="precomputed"``) or by
    :class:`~sklearn.cluster.KMeans` of the unit gradients.

    :meth:`transform` returns an ``(n_examples, n_components)`` non-negative matrix that
    inspection tools read like NPEFF's coefficients ``W``: ``W[i, j]`` is the affinity
    of example ``i``'s gradient to cluster ``j``'s mean direction (the normalized mean
    of its training members' unit gradients) when ``i`` belongs to ``j``, 0 otherwise.
    Held-out examples belong to the cluster of highest affinity (spectral clustering,
    which has no out-of-sample rule of its own) or of nearest centroid (k-means), so
    :meth:`transform` of the training examples may differ from ``labels_`` for
    spectral clustering. One cluster per example: it cannot give an example two
    factors.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier in eval mode returning logits ``(batch, n_outputs)`` (or an object
        with ``.logits``); one logit is read as a Bernoulli variable. Never modified.
    n_components : int, default=8
        Number of clusters.
    target : {"predicted", "true"}, default="predicted"
        The label whose log-probability is differentiated: the model's prediction, or
        ``y`` (then ``y`` must be given to :meth:`fit` and :meth:`transform`).
    method : {"spectral", "kmeans"}, default="spectral"
        Spectral clustering of the affinity matrix (``n_examples ** 2`` memory), or
        k-means of the (projected) unit gradients.
    n_projections : int or None, default=256
        Dimension of the random projection. ``None``, or a number at least the number of
        parameters: no projection; the fit then holds every example's full gradient
        (``n_examples * n_params`` floats), fine for small models only.
    coefficients : {"hard", "soft"}, default="hard"
        ``"hard"``: the affinity to the example's own cluster only (above).
        ``"soft"``: the affinity to every cluster's mean direction.
    params : list of str or callable, default=None
        Parameters to differentiate, as in :class:`~sknpeff.pef.PEFTransformer`
        (``None``: every parameter with ``requires_grad=True``).
    n_init : int, default=10
        Restarts of k-means (in ``method="kmeans"``, and in spectral clustering's label
        assignment).
    forward : callable, default=None
        ``forward(model, batch) -> logits`` for models with another signature.
    batch_size : int, default=32
        Examples per batch of gradients.
    device : str or torch.device, default=None
        Must be the device of the model's parameters (``None``: that device).
    random_state : int, RandomState instance or None, default=None
        Seed of the projection and of the clustering.

    Attributes
    ----------
    labels_ : ndarray of shape (n_examples,)
        Cluster of each training example.
    cluster_centers_ : ndarray of shape (n_components, n_features)
        Unit mean direction of each cluster (projected space; zero for an empty
        cluster).
    projection_ : SparseRandomProjection or None
        The fitted projection (``None``: none).
    clusterer_ : SpectralClustering or KMeans
        The fitted clustering.
    layout_ : ParameterLayout
        The differentiated parameters.
    n_features_in_ : int
        Number of input features, when ``X`` is a two-dimensional array.

    See Also
    --------
    ActivationKMeans, ActivationSAE

    Examples
    --------
    >>> import torch
    >>> from sknpeff.baselines import GradientClustering
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 3)).eval()
    >>> X = torch.randn(40, 4)
    >>> gc = GradientClustering(model, n_components=3, random_state=0).fit(X)
    >>> W = gc.transform(X)
    >>> W.shape, bool((W >= 0).all() and (W <= 1).all()), int((W > 0).sum(axis=1).max())
    ((40, 3), True, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_components: int = 8,
        target: str = "predicted",
        method: str = "spectral",
        n_projections: int | None = 256,
        coefficients: str = "hard",
        params: Sequence[str] | Callable[[str, nn.Parameter], bool] | None = None,
        n_init: int = 10,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        random_state=None,
    ):
        self.model = model
        self.n_components = n_components
        self.target = target
        self.method = method
        self.n_projections = n_projections
        self.coefficients = coefficients
        self.params = params
        self.n_init = n_init
        self.forward = forward
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    def _validate(self) -> torch.device:
        check_int(self.n_components, "n_components", low=1)
        check_choice(self.target, "target", ("predicted", "true"))
        check_choice(self.method, "method", ("spectral", "kmeans"))
        check_int(self.n_projections, "n_projections", low=1, allow_none=True)
        check_choice(self.coefficients, "coefficients", ("hard", "soft"))
        check_int(self.n_init, "n_init", low=1)
        return self._check_model()

    def _labels(self, y):
        if self.target == "predicted":
            return None
        if y is None:
            raise ValueError("target='true' needs the labels y (one per example).")
        return np.asarray(y)

    def _unit_gradients(self, X, y, device) -> np.ndarray:
        """Unit (projected, unit again) gradients of the examples, ``(n, n_features)``."""
        chunks = []
        for g in iter_log_prob_gradients(self.model, X, y, params=self.params,
                                         forward=self.forward, batch_size=self.batch_size,
                                         device=device):
            # unit rows before the projection (the method's definition), after it too
            u = _unit_rows(g.double().cpu().numpy())
            if self.projection_ is not None:
                u = _unit_rows(self.projection_.transform(u))
            chunks.append(u)
        U = np.concatenate(chunks, axis=0)
        self._check_finite(U, "the gradients")
        return U

    def fit(self, X, y=None):
        """Cluster the examples' gradients.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples, in any form :class:`~sknpeff.pef.PEFTransformer` reads.
        y : array-like of shape (n_examples,), default=None
            Labels; used (and required) only with ``target="true"``.

        Returns
        -------
        self : GradientClustering
        """
        device = self._validate()
        X = self._check_examples(X, reset=True)
        y = self._labels(y)
        self.layout_ = ParameterLayout.from_model(self.model, self.params)
        rng = check_random_state(self.random_state)
        proj_seed, cluster_seed = (int(s) for s in rng.randint(np.iinfo(np.int32).max, size=2))
        n_params = self.layout_.n_params
        if self.n_projections is None or self.n_projections >= n_params:
            self.projection_ = None
        else:
            # sparse: ~n_projections * sqrt(n_params) nonzeros, not n_projections * n_params
            self.projection_ = SparseRandomProjection(
                n_components=self.n_projections, dense_output=True, random_state=proj_seed
            ).fit(sp.csr_matrix((1, n_params)))
        U = self._unit_gradients(X, y, device)
        n, k = U.shape[0], self.n_components
        if n < k:
            raise ValueError(
                f"n_samples={n} should be >= n_components={k}: each cluster needs an example."
            )
        if self.method == "spectral":
            clusterer = SpectralClustering(
                n_clusters=k, affinity="precomputed", n_init=self.n_init,
                random_state=cluster_seed,
            ).fit(angular_affinity(U, U))
        else:
            clusterer = KMeans(n_clusters=k, n_init=self.n_init,
                               random_state=cluster_seed).fit(U)
        labels = np.asarray(clusterer.labels_)
        sums = np.zeros((k, U.shape[1]))
        np.add.at(sums, labels, U)
        self.clusterer_ = clusterer
        self.labels_ = labels
        self.cluster_centers_ = _unit_rows(sums)
        return self

    def transform(self, X, y=None) -> np.ndarray:
        """Cluster membership weighted by angular affinity to the cluster (non-negative).

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples.
        y : array-like of shape (n_examples,), default=None
            Labels; required only with ``target="true"``.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Values in ``[0, 1]``; one nonzero per row with ``coefficients="hard"``.
        """
        check_is_fitted(self, "clusterer_")
        device = self._validate()
        X = self._check_examples(X, reset=False)
        if ParameterLayout.from_model(self.model, self.params) != self.layout_:
            raise ValueError("the model's parameters changed since fit.")
        U = self._unit_gradients(X, self._labels(y), device)
        A = angular_affinity(U, self.cluster_centers_)
        if self.coefficients == "soft":
            return A
        if self.method == "kmeans":
            own = self.clusterer_.predict(U)
        else:
            own = A.argmax(axis=1)
        return np.where(np.arange(A.shape[1])[None, :] == own[:, None], A, 0.0)

    def fit_transform(self, X, y=None, **fit_params) -> np.ndarray:
        """:meth:`fit`, then :meth:`transform` of the same examples (``y`` passed to both).

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples.
        y : array-like of shape (n_examples,), default=None
            Labels; required only with ``target="true"``.
        **fit_params : dict
            Not used.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
        """
        return self.fit(X, y).transform(X, y)
