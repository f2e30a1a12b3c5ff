"""A standard ReLU sparse autoencoder on a layer's activations (TMLR revision's baseline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..utils import check_choice, check_float, check_int
from ._activation_kmeans import check_layers
from ._base import POOLS, ModelBaselineMixin, iter_layer_activations, pool_positions

__all__ = ["ActivationSAE"]


class ActivationSAE(ModelBaselineMixin, TransformerMixin, BaseEstimator):
    """A sparse autoencoder of a layer's activations; its latents as coefficients.

    The standard ReLU sparse autoencoder (as in SAELens), the activation baseline of the
    TMLR revision of Matena & Raffel (arXiv 2310.04649). With ``x`` a layer's activation
    vector (scaled by ``scale_`` so that its mean norm is ``sqrt(n_features)``)::

        f = ReLU(W_enc (x - b_dec) + b_enc)          # n_components latents
        x_hat = W_dec f + b_dec
        loss = ||x - x_hat||^2 + l1_coef * sum_k f_k ||W_dec[:, k]||

    averaged over training vectors, minimized with Adam. The latents ``f`` are the
    non-negative coefficients :meth:`transform` returns. A sequence model's activations
    ``(batch, positions, ..., features)`` are encoded at every position (each position is
    a training vector) and the latents pooled over positions (``pool``).

    Parameters
    ----------
    model : torch.nn.Module
        A model in eval mode. It is never modified.
    layer : str or list of str, default=""
        Name(s) of the module(s) whose outputs are encoded (as in
        ``model.named_modules()``; ``""`` is the model itself: its output); several
        are concatenated along their last axis (they must have the same positions).
    n_components : int, default=8
        Number of latents (dictionary size).
    l1_coef : float, default=1.0
        Weight ``l1_coef`` of the sparsity penalty.
    pool : {"max", "mean", "last"}, default="max"
        How per-position latents become one vector per example (padding included):
        the maximum over positions (did the latent fire anywhere?), the mean, or the
        latents of the last position (a causal model's next-token prediction).
        Unused for ``(batch, features)`` activations.
    max_iter : int, default=300
        Training epochs (passes over the training vectors).
    learning_rate : float, default=1e-3
        Adam's learning rate.
    train_batch_size : int, default=256
        Training vectors per Adam step.
    forward : callable, default=None
        ``forward(model, batch)`` for models with another signature (as in
        :class:`~sknpeff.pef.PEFTransformer`); its output is not used.
    batch_size : int, default=64
        Examples per forward pass of the model.
    device : str or torch.device, default=None
        Must be the device of the model's parameters (``None``: that device); the
        autoencoder is trained there.
    random_state : int, RandomState instance or None, default=None
        Seed of the initialization and of the order of the training vectors.

    Attributes
    ----------
    W_enc_ : ndarray of shape (n_components, n_features)
    b_enc_ : ndarray of shape (n_components,)
    W_dec_ : ndarray of shape (n_features, n_components)
        Decoder; column ``k`` is latent ``k``'s direction (scaled activation space).
    b_dec_ : ndarray of shape (n_features,)
    scale_ : float
        Factor applied to the activations before encoding.
    loss_curve_ : list of float
        Mean training loss of each epoch.
    n_iter_ : int
        Training epochs run (``max_iter``).
    n_features_in_ : int
        Number of input features, when ``X`` is a two-dimensional array.

    See Also
    --------
    ActivationKMeans, GradientClustering

    Examples
    --------
    >>> import torch
    >>> from sknpeff.baselines import ActivationSAE
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3)).eval()
    >>> X = torch.randn(40, 4)
    >>> sae = ActivationSAE(model, layer="1", n_components=6, max_iter=20,
    ...                     random_state=0).fit(X)
    >>> W = sae.transform(X)
    >>> W.shape, bool((W >= 0).all())
    ((40, 6), True)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | Sequence[str] = "",
        *,
        n_components: int = 8,
        l1_coef: float = 1.0,
        pool: str = "max",
        max_iter: int = 300,
        learning_rate: float = 1e-3,
        train_batch_size: int = 256,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        random_state=None,
    ):
        self.model = model
        self.layer = layer
        self.n_components = n_components
        self.l1_coef = l1_coef
        self.pool = pool
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.train_batch_size = train_batch_size
        self.forward = forward
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    def _validate(self) -> tuple[list[str], torch.device]:
        layers = check_layers(self.layer)
        check_int(self.n_components, "n_components", low=1)
        check_float(self.l1_coef, "l1_coef", low=0.0)
        check_choice(self.pool, "pool", POOLS)
        check_int(self.max_iter, "max_iter", low=1)
        check_float(self.learning_rate, "learning_rate", low=0.0, strict=True)
        check_int(self.train_batch_size, "train_batch_size", low=1)
        return layers, self._check_model()

    def _positions(self, X, layers, device) -> list[torch.Tensor]:
        """Per batch, float32 activations ``(batch, positions, features)``."""
        out = []
        for acts in iter_layer_activations(self.model, X, layers, forward=self.forward,
                                           batch_size=self.batch_size, device=device):
            flat = []
            for a in acts:
                if a.ndim < 2:
                    raise ValueError(
                        f"a layer's activations must have a batch axis and a feature axis; "
                        f"got shape {tuple(a.shape)}."
                    )
                flat.append(a.reshape(a.shape[0], -1, a.shape[-1]))
            if len({f.shape[1] for f in flat}) > 1:
                raise ValueError(
                    "the layers' activations have different numbers of positions "
                    f"({[f.shape[1] for f in flat]}); name layers of one sequence."
                )
            a = torch.cat(flat, dim=2).float()
            if not bool(torch.isfinite(a).all()):
                raise ValueError("the activations contain NaN or inf; check the inputs.")
            out.append(a)
        return out

    def _encode(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        pre = (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
        return torch.relu(pre)

    def fit(self, X, y=None):
        """Train the autoencoder on the activations of ``X``.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples, in any form :class:`~sknpeff.pef.PEFTransformer` reads.
        y : ignored

        Returns
        -------
        self : ActivationSAE
        """
        layers, device = self._validate()
        X = self._check_examples(X, reset=True)
        vecs = torch.cat([a.reshape(-1, a.shape[-1]) for a in self._positions(X, layers, device)])
        n, d = vecs.shape
        k = self.n_components
        mean_norm = float(vecs.norm(dim=1).mean())
        self.scale_ = float(np.sqrt(d) / mean_norm) if mean_norm > 0 else 1.0
        vecs = vecs * self.scale_
        rng = check_random_state(self.random_state)
        gen = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        W_dec = torch.randn(d, k, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)
        params = {
            "W_enc": W_dec.T.clone(),
            "b_enc": torch.zeros(k),
            "W_dec": W_dec,
            "b_dec": vecs.mean(dim=0).cpu(),
        }
        params = {name: v.to(device).requires_grad_(True) for name, v in params.items()}
        opt = torch.optim.Adam(list(params.values()), lr=self.learning_rate)
        bs = min(self.train_batch_size, n)
        self.loss_curve_ = []
        with torch.enable_grad():
            for _ in range(self.max_iter):
                order = torch.randperm(n, generator=gen).to(device)
                total = 0.0
                for s in range(0, n, bs):
                    x = vecs[order[s : s + bs]]
                    f = self._encode(x, params)
                    x_hat = f @ params["W_dec"].T + params["b_dec"]
                    penalty = (f * params["W_dec"].norm(dim=0)).sum(dim=1)
                    loss = (((x - x_hat) ** 2).sum(dim=1) + self.l1_coef * penalty).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * x.shape[0]
                self.loss_curve_.append(total / n)
        self.W_enc_ = params["W_enc"].detach().cpu().double().numpy()
        self.b_enc_ = params["b_enc"].detach().cpu().double().numpy()
        self.W_dec_ = params["W_dec"].detach().cpu().double().numpy()
        self.b_dec_ = params["b_dec"].detach().cpu().double().numpy()
        self.n_iter_ = self.max_iter
        return self

    def transform(self, X) -> np.ndarray:
        """The latents of each example (pooled over positions), non-negative.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
        """
        check_is_fitted(self, "W_enc_")
        layers, device = self._validate()
        X = self._check_examples(X, reset=False)
        params = {"W_enc": self.W_enc_, "b_enc": self.b_enc_, "b_dec": self.b_dec_}
        params = {name: torch.as_tensor(v, dtype=torch.float32, device=device)
                  for name, v in params.items()}
        rows = []
        for a in self._positions(X, layers, device):
            if a.shape[2] != self.W_enc_.shape[1]:
                raise ValueError(
                    f"the activations have {a.shape[2]} features but {self.W_enc_.shape[1]} "
                    "at fit; has the model changed?"
                )
            f = self._encode(a * self.scale_, params)
            f = pool_positions(f, self.pool)
            rows.append(f.double().cpu().numpy())
        return np.concatenate(rows, axis=0)
