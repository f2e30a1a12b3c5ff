"""Guided perturbations: check that a component is part of the model's processing.

For an NPEFF component ``j``, :class:`GuidedPerturber` builds a parameter perturbation
``delta`` that the component's pseudo-Fisher says should change the predictions of the
component's top examples much more than those of other examples (method doc section 4):

* **Low rank** (:class:`~sknpeff.decomposition.LowRankNPEFF`): since
  ``delta^T H_k delta = (g_k . delta)^2``, ``delta`` is ``+-g_j`` with its part in the span
  of the *other* components that are not similar to ``g_j`` (``|cos| < max_cosine``)
  removed by an exact orthogonal projection (QR of those components), scaled to
  ``||delta|| = magnitude``.
* **Diagonal** (:class:`~sknpeff.decomposition.DiagonalNPEFF`): per parameter, the
  original value ``theta`` and a pushed value ``p = theta - s Delta sign(grad)`` (``grad``
  the gradient of the loss summed over the component's top examples) are blended with
  Fisher weights, ``theta' = (w1 theta + w2 p) / (w1 + w2)``,
  ``w1 = (1 - lambda) max(F_dataset, floor)``, ``w2 = lambda h_j`` (both Fishers
  unit-normalized). ``Delta`` (log scale) and ``lambda`` in ``(0.035, 0.965)`` are searched
  until the mean KL on the top examples falls in ``kl_target``. Where the reference drew
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

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.special
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .layout import ParameterLayout
from .pef._inputs import (
    as_logits,
    as_tensor,
    default_forward,
    iter_batches,
    n_examples,
    tree_map,
)

__all__ = ["GuidedPerturber", "KLRatioResult", "KLRatioResults"]

#: bounds of the blend weight lambda in the diagonal search (method doc section 4)
_LAMBDA_RANGE = (0.035, 0.965)
#: log10 range of the push size Delta searched for the diagonal perturbation
_LOG_DELTA_RANGE = (-6.0, 2.0)
#: bisection steps on log Delta per value of lambda
_BISECT_STEPS = 14
#: parameters per chunk when streaming the components (bounds float64 temporaries)
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class KLRatioResult:
    """Selectivity of one component's guided perturbation.

    Attributes
    ----------
    component : int
        Component index.
    kl_ratio : float
        ``top_kl / baseline_kl`` for the better sign (``inf`` when only the baseline KL is
        zero, ``nan`` when both are).
    sign : int
        The sign (+1 or -1) of the perturbation that gave ``kl_ratio``.
    top_kl : float
        Mean KL over the component's top examples.
    baseline_kl : float
        Mean KL over the random baseline set.
    norm_ratio : float
        Mean PEF norm of the top examples over that of the baseline set (``nan`` when no
        norms were given). The KL ratio should clearly exceed it.
    accuracy_change : float or None
        Accuracy of the perturbed model on the top examples minus the original accuracy
        (``None`` when no labels were given).
    kl_ratio_other_sign : float
        The KL ratio of the other sign.
    top_indices : ndarray of int64
        The top examples (rows of ``X``), by decreasing coefficient.
    baseline_indices : ndarray of int64
        The baseline examples.
    details : dict
        Extra facts: for diagonal perturbations the chosen ``delta`` (push size),
        ``lambda`` and whether the KL target was reached, for each sign.
    """

    component: int
    kl_ratio: float
    sign: int
    top_kl: float
    baseline_kl: float
    norm_ratio: float
    accuracy_change: float | None
    kl_ratio_other_sign: float = float("nan")
    top_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    baseline_indices: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64), repr=False)
    details: dict = field(default_factory=dict, repr=False)


class KLRatioResults(list):
    """List of :class:`KLRatioResult`, one per component, with array views of its fields.

    ``results.kl_ratio``, ``results.norm_ratio``, ``results.sign``, ``results.top_kl``,
    ``results.baseline_kl`` and ``results.accuracy_change`` are ndarrays (the last holds
    ``nan`` where no labels were given), ready for :func:`sknpeff.inspection.report`.
    """

    def _field(self, name: str) -> np.ndarray:
        vals = [getattr(r, name) for r in self]
        return np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)

    @property
    def kl_ratio(self) -> np.ndarray:
        """KL ratio of each component."""
        return self._field("kl_ratio")

    @property
    def norm_ratio(self) -> np.ndarray:
        """PEF-norm ratio of each component."""
        return self._field("norm_ratio")

    @property
    def sign(self) -> np.ndarray:
        """Chosen sign of each component."""
        return np.asarray([r.sign for r in self], dtype=np.int64)

    @property
    def top_kl(self) -> np.ndarray:
        """Mean KL over the top examples of each component."""
        return self._field("top_kl")

    @property
    def baseline_kl(self) -> np.ndarray:
        """Mean KL over the baseline set of each component."""
        return self._field("baseline_kl")

    @property
    def accuracy_change(self) -> np.ndarray:
        """Accuracy change on the top examples (``nan`` without labels)."""
        return self._field("accuracy_change")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _n_rows(X: Any) -> int:
    """Number of examples in ``X`` (the PEF transformer's rules); it must be known."""
    n = n_examples(X)
    if n is None:
        raise ValueError("X must have a known length (a Dataset without __len__ cannot be "
                         "ranked into top examples).")
    return n


def _take(X: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of ``X`` (any input form :class:`~sknpeff.PEFTransformer` accepts)."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(X, torch.Tensor):
        return X[torch.from_numpy(idx).to(X.device)]
    if isinstance(X, np.ndarray):
        return X[idx]
    if isinstance(X, Mapping):
        return {k: (_take(v, idx) if hasattr(v, "shape") and len(v.shape) else v)
                for k, v in X.items()}
    if isinstance(X, torch.utils.data.Dataset):
        return torch.utils.data.Subset(X, idx.tolist())
    return [X[int(i)] for i in idx]


def _unwrap(estimator: Any) -> Any:
    """The decomposition behind a Pipeline or a ComponentExpander."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        estimator = estimator[-1]
    inner = getattr(estimator, "estimator_", None)
    if inner is not None and hasattr(inner, "components_"):
        return inner
    return estimator


def _pipeline_layout(estimator: Any) -> ParameterLayout | None:
    """The ``layout_`` of a fitted Pipeline's PEFTransformer step, if any."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps[:-1]:
            layout = getattr(step, "layout_", None)
            if isinstance(layout, ParameterLayout):
                return layout
    return None


def _estimator_kind(estimator: Any) -> str:
    from .decomposition import DiagonalNPEFF, LowRankNPEFF

    inner = _unwrap(estimator)
    if isinstance(inner, LowRankNPEFF):
        return "low_rank"
    if isinstance(inner, DiagonalNPEFF):
        return "diagonal"
    raise ValueError(
        "estimator must be a fitted LowRankNPEFF or DiagonalNPEFF (or a Pipeline ending in "
        "one, or a ComponentExpander of one); got "
        f"{type(estimator).__name__}.")


def _safe_ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    if num > 0:
        return float("inf")
    return float("nan")


def _rank_key(ratio: float) -> float:
    return -np.inf if np.isnan(ratio) else ratio


def _check_pos_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)


def _check_sign(sign: Any) -> int:
    if isinstance(sign, bool) or sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}.")
    return int(sign)


# ---------------------------------------------------------------------------------------------
# the perturber
# ---------------------------------------------------------------------------------------------
class GuidedPerturber:
    """Perturb a model along one NPEFF component and measure the effect.

    Parameters
    ----------
    estimator : LowRankNPEFF, DiagonalNPEFF, ComponentExpander or Pipeline
        A fitted decomposition (a Pipeline's last step, or a ComponentExpander's expanded
        estimator, is used). Its ``components_`` are full-width ``(r, n_params)`` and
        refer to ``layout``. It is never modified. With a Pipeline
        (``PEFTransformer`` then a decomposition), ``layout`` defaults to the
        transformer's ``layout_`` and ``W`` defaults to ``pipeline.transform(X)``.
    model : torch.nn.Module
        The model whose PEFs were decomposed. Its parameters are changed only inside
        :meth:`perturbed` (and restored bit for bit on exit).
    layout : ParameterLayout, default=None
        The flat parameter order of the components: the ``layout_`` of the
        :class:`~sknpeff.PEFTransformer` that computed the PEFs. Default:
        ``ParameterLayout.from_model(model)`` (every parameter requiring grad), which is
        right only when the transformer used ``params=None``.
    magnitude : float, default=0.1
        Low rank: the norm of ``delta`` (paper: 0.1; 0.3 for fixing heuristics).
    max_cosine : float, default=0.35
        Low rank: ``delta`` is made orthogonal to every other component whose ``|cos|``
        with ``g_j`` is below this (similar components are left alone so that they do not
        cancel ``g_j``). ``0`` disables the projection.
    forward : callable, default=None
        ``forward(model, batch) -> logits``, as for :class:`~sknpeff.PEFTransformer`.
    batch_size : int, default=32
        Examples per forward pass.
    kl_target : tuple of float, default=(0.05, 0.2)
        Diagonal: the range the mean KL on the top examples is searched into.
    fisher_floor : float, default=1e-6
        Diagonal: floor on the unit-normalized dataset Fisher in ``w1`` (parameters the
        data set barely uses are pushed by the full ``Delta`` when the component uses
        them).
    n_lambda : int, default=5
        Diagonal: number of values of ``lambda`` tried (evenly spaced in log-odds over
        ``(0.035, 0.965)``); for each, ``Delta`` is found by bisection on its log.

    Attributes
    ----------
    layout_ : ParameterLayout
        The layout used.
    kind_ : {"low_rank", "diagonal"}
        Kind of the decomposition.
    dataset_fisher_ : ndarray of shape (n_params,)
        Diagonal only, after :meth:`fit`: the dataset-level diagonal Fisher (mean of the
        unnormalized per-example diagonal Fishers of the examples passed to ``fit``).

    Notes
    -----
    Low rank needs no data to build ``delta``. Diagonal perturbations depend on the
    component's top examples and the dataset Fisher: call :meth:`fit` before
    :meth:`perturbation` / :meth:`perturbed` / :meth:`kl_divergence`; :meth:`kl_ratio`
    builds them from its own ``X`` and ``W`` (reusing ``dataset_fisher_`` when fitted).

    Examples
    --------
    >>> from sknpeff.datasets import make_gated_experts
    >>> from sknpeff.pef import PEFTransformer
    >>> from sknpeff.decomposition import LowRankNPEFF
    >>> from sknpeff.perturbation import GuidedPerturber
    >>> model, sample, _ = make_gated_experts(random_state=0)
    >>> X, _ = sample(300, random_state=0)
    >>> pef = PEFTransformer(model, kind="low_rank", n_values=400).fit(X)
    >>> res = pef.compute(X)
    >>> est = LowRankNPEFF(n_components=8, n_classes=pef.n_classes_, random_state=0)
    >>> W = est.fit_transform(res.pefs)
    >>> gp = GuidedPerturber(est, model, layout=pef.layout_)
    >>> delta = gp.perturbation(0)
    >>> delta.shape == (pef.n_params_,)
    True
    >>> out = gp.kl_ratio(X, 0, W=W, n_top=32, norms=res.norms, random_state=0)
    >>> out.sign in (1, -1)
    True
    """

    def __init__(self, estimator: Any, model: nn.Module, *, layout: ParameterLayout | None = None,
                 magnitude: float = 0.1, max_cosine: float = 0.35,
                 forward: Callable[[nn.Module, Any], Any] | None = None, batch_size: int = 32,
                 kl_target: tuple[float, float] = (0.05, 0.2), fisher_floor: float = 1e-6,
                 n_lambda: int = 5) -> None:
        self.estimator = estimator
        self.model = model
        self.layout = layout
        self.magnitude = magnitude
        self.max_cosine = max_cosine
        self.forward = forward
        self.batch_size = batch_size
        self.kl_target = kl_target
        self.fisher_floor = fisher_floor
        self.n_lambda = n_lambda
        self._validate()
        self._cache: dict = {}

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(self.model).__name__}.")
        self.kind_ = _estimator_kind(self.estimator)
        check_is_fitted(_unwrap(self.estimator), "components_")
        for name, value, low in (("magnitude", self.magnitude, 0.0),
                                 ("fisher_floor", self.fisher_floor, 0.0)):
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not np.isfinite(value) or value <= low):
                raise ValueError(f"{name} must be a finite number > {low}, got {value!r}.")
        mc = self.max_cosine
        if isinstance(mc, bool) or not isinstance(mc, numbers.Real) or not 0.0 <= mc <= 1.0:
            raise ValueError(f"max_cosine must be a number in [0, 1], got {mc!r}.")
        _check_pos_int("batch_size", self.batch_size)
        _check_pos_int("n_lambda", self.n_lambda)
        try:
            lo, hi = (float(v) for v in self.kl_target)
        except (TypeError, ValueError):
            raise ValueError("kl_target must be a pair (low, high) of positive floats, got "
                             f"{self.kl_target!r}.") from None
        if not 0.0 < lo < hi or not np.isfinite(hi):
            raise ValueError(f"kl_target must satisfy 0 < low < high, got {self.kl_target!r}.")
        if self.forward is not None and not callable(self.forward):
            raise ValueError("forward must be None or a callable forward(model, batch).")
        layout = self.layout
        if layout is None:
            layout = _pipeline_layout(self.estimator)
        if layout is None:
            layout = ParameterLayout.from_model(self.model)
        elif not isinstance(layout, ParameterLayout):
            raise ValueError("layout must be None or a ParameterLayout (e.g. the layout_ of "
                             f"the PEFTransformer); got {type(layout).__name__}.")
        named = dict(self.model.named_parameters(remove_duplicate=False))
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            if name not in named:
                raise ValueError(f"layout names parameter {name!r}, which the model lacks.")
            if tuple(named[name].shape) != shape:
                raise ValueError(f"layout shape of {name!r} is {shape}, the model's is "
                                 f"{tuple(named[name].shape)}.")
        width = self._components().shape[1]
        if width != layout.n_params:
            raise ValueError(
                f"the estimator's components have {width} parameters but the layout has "
                f"{layout.n_params}: pass layout=<PEFTransformer>.layout_ (the same params "
                "subset the PEFs were computed on).")
        self.layout_ = layout

    def _components(self) -> np.ndarray:
        return np.asarray(_unwrap(self.estimator).components_)

    def _component_index(self, component: Any) -> int:
        r = self._components().shape[0]
        if (isinstance(component, bool) or not isinstance(component, numbers.Integral)
                or not -r <= component < r):
            raise ValueError(f"component must be an integer in [0, {r}), got {component!r}.")
        return int(component) % r

    def _params(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        return [named[n] for n in self.layout_.names]

    def _device(self) -> torch.device:
        return self._params()[0].device

    # ------------------------------------------------------------------- low rank
    def _gram(self, G: np.ndarray) -> np.ndarray:
        """``G G^T`` in float64 (cached for the current components array)."""
        cached = self._cache.get("gram")
        if cached is not None and cached[0] is G:
            return cached[1]
        r, m = G.shape
        M = np.zeros((r, r))
        for s in range(0, m, _CHUNK):
            B = G[:, s:s + _CHUNK].astype(np.float64)
            M += B @ B.T
        self._cache["gram"] = (G, M)
        return M

    def _low_rank_direction(self, j: int) -> np.ndarray:
        """Unit ``g_j`` with its part in the span of the dissimilar components removed.

        The projection onto the orthogonal complement of ``span{g_k : k in S}`` uses the
        pseudo-inverse of their float64 Gram matrix (numerical range only, so dependent
        components are fine) followed by refinement passes, streaming ``G`` in column
        chunks: no ``(n_params, r)`` float64 copy is made, which matters at paper scale.
        """
        G = self._components()  # (r, m), not copied
        r, m = G.shape
        M = self._gram(G)
        norms = np.sqrt(np.maximum(np.diag(M), 0.0))
        if norms[j] == 0:
            raise ValueError(f"component {j} is zero: no perturbation direction.")
        cos = np.abs(M[j]) / (np.where(norms > 0, norms, 1.0) * norms[j])
        others = np.asarray([k for k in range(r)
                             if k != j and norms[k] > 0 and cos[k] < self.max_cosine], np.int64)
        g = G[j].astype(np.float64) / norms[j]
        d = g
        if others.size:
            w, V = np.linalg.eigh(M[np.ix_(others, others)])
            keep = w > max(w.max(), 0.0) * 1e-13
            pinv = (V[:, keep] / w[keep]) @ V[:, keep].T
            GS = G[others]
            d = g.copy()
            scale = float(np.sqrt(np.sum(norms[others] ** 2)))
            for _ in range(4):  # projection, then refinement until orthogonal to rounding
                b = np.zeros(others.size)
                for s in range(0, m, _CHUNK):
                    b += GS[:, s:s + _CHUNK].astype(np.float64) @ d[s:s + _CHUNK]
                dn = float(np.linalg.norm(d))
                if np.abs(b).max() <= 1e-15 * scale * max(dn, 1e-300):
                    break
                c = pinv @ b
                for s in range(0, m, _CHUNK):
                    d[s:s + _CHUNK] -= GS[:, s:s + _CHUNK].astype(np.float64).T @ c
        dn = np.linalg.norm(d)
        if dn <= 1e-8:
            warnings.warn(
                f"component {j} lies in the span of the other components it is not similar "
                "to; its projected direction vanishes and g_j itself is used.",
                UserWarning, stacklevel=3)
            return g
        return d / dn

    # ------------------------------------------------------------------- diagonal
    def fit(self, X: Any, W: np.ndarray | None = None, *, pefs: Any = None,
            labels: Any = None, n_top: int = 128, n_fisher: int = 1024,
            dataset_fisher: Any = None, random_state: Any = None) -> GuidedPerturber:
        """Prepare data-dependent (diagonal) perturbations.

        Needed before :meth:`perturbation`, :meth:`perturbed` and :meth:`kl_divergence`
        for a :class:`~sknpeff.decomposition.DiagonalNPEFF`; a no-op apart from
        validation for low rank. Computes the dataset-level diagonal Fisher on up to
        ``n_fisher`` random examples of ``X`` and records each component's top examples.

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset
            Examples, as the model eats them.
        W : ndarray of shape (n_examples, n_components), default=None
            Coefficients of ``X``; computed as ``estimator.transform(pefs)`` when omitted.
        pefs : sparse matrix or PEFResult, default=None
            PEFs of ``X`` (used only when ``W`` is omitted).
        labels : array-like of shape (n_examples,), default=None
            Labels for the loss whose gradient sign is pushed along; the model's
            predictions when omitted.
        n_top : int, default=128
            Top examples per component.
        n_fisher : int, default=1024
            Examples used for the dataset Fisher.
        dataset_fisher : array-like of shape (n_params,), default=None
            A precomputed non-negative dataset-level diagonal Fisher (then ``n_fisher`` is
            unused).
        random_state : int, RandomState instance or None, default=None
            Seeds the choice of the Fisher and selection examples.

        Returns
        -------
        self : GuidedPerturber
        """
        self._validate()
        n = _n_rows(X)
        W = self._resolve_W(W, pefs, n, X)
        n_top = _check_pos_int("n_top", n_top)
        n_fisher = _check_pos_int("n_fisher", n_fisher)
        rng = check_random_state(random_state)
        self._cache = {}
        if self.kind_ == "diagonal":
            if dataset_fisher is None:
                fis = np.sort(rng.choice(n, size=min(n, n_fisher), replace=False))
                self.dataset_fisher_ = self._dataset_fisher(_take(X, fis))
            else:
                F = np.array(dataset_fisher, dtype=np.float64).ravel()
                if F.shape != (self.layout_.n_params,) or not np.all(np.isfinite(F)) or \
                        F.min(initial=0.0) < 0:
                    raise ValueError("dataset_fisher must be a finite non-negative vector of "
                                     f"length n_params={self.layout_.n_params}.")
                self.dataset_fisher_ = F
            self._fit_data = {"X": X, "W": W, "labels": labels, "n_top": min(n_top, n),
                              "select": np.sort(rng.choice(n, size=min(n, 256),
                                                           replace=False))}
        return self

    def _dataset_fisher(self, X: Any) -> np.ndarray:
        from .pef import PEFTransformer

        pt = PEFTransformer(self.model, kind="diagonal", n_values=self.layout_.n_params,
                            normalize=False, params=list(self.layout_.names),
                            forward=self.forward, batch_size=self.batch_size,
                            dtype="float64", allow_train_mode=True)
        pefs = pt.fit(X).transform(X)
        return np.asarray(pefs.mean(axis=0), dtype=np.float64).ravel()

    def _loss_grad_sign(self, X: Any, labels: np.ndarray | None) -> np.ndarray:
        """Sign of the gradient of the summed cross-entropy over ``X`` (flat, float64)."""
        params = self._params()
        fwd = self.forward if self.forward is not None else default_forward
        grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        start = 0
        for batch in iter_batches(X, int(self.batch_size)):
            logits = as_logits(fwd(self.model, self._to_device(batch)))
            b = logits.shape[0]
            if labels is None:
                y = logits.detach().argmax(dim=1)
            else:
                y = torch.as_tensor(np.asarray(labels[start:start + b]),
                                    device=logits.device).long()
            start += b
            loss = torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum")
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(grads, gs, strict=True):
                if g is not None:
                    acc += g.double()
        flat = torch.cat([g.reshape(-1) for g in grads]).cpu().numpy()
        return np.sign(flat)

    def _diagonal_profile(self, j: int, fisher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = np.maximum(self._components()[j].astype(np.float64), 0.0)
        hn = np.linalg.norm(h)
        if hn == 0:
            raise ValueError(f"component {j} is zero: no perturbation direction.")
        fn = np.linalg.norm(fisher)
        F = fisher / fn if fn > 0 else np.zeros_like(fisher)
        return h / hn, np.maximum(F, float(self.fisher_floor))

    @staticmethod
    def _blend_delta(push: np.ndarray, h: np.ndarray, Ff: np.ndarray, lam: float,
                     size: float) -> np.ndarray:
        # theta' = (w1 theta + w2 p) / (w1 + w2) = theta + w2 / (w1 + w2) (p - theta)
        w1 = (1.0 - lam) * Ff
        w2 = lam * h
        return size * push * (w2 / (w1 + w2))

    def _diagonal_search(self, j: int, sign: int, X_top: Any, X_sel: Any, fisher: np.ndarray,
                         labels_top: np.ndarray | None, lp_top: np.ndarray,
                         lp_sel: np.ndarray,
                         grad_sign: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Search ``lambda`` and ``Delta`` (see the module docstring); returns delta, facts."""
        if grad_sign is None:
            grad_sign = self._loss_grad_sign(X_top, labels_top)
        h, Ff = self._diagonal_profile(j, fisher)
        push = -float(sign) * grad_sign
        lo_t, hi_t = (float(v) for v in self.kl_target)
        mid_t = np.sqrt(lo_t * hi_t)
        lo_l, hi_l = (np.log(v / (1 - v)) for v in _LAMBDA_RANGE)
        lams = 1.0 / (1.0 + np.exp(-np.linspace(lo_l, hi_l, int(self.n_lambda))))
        best: tuple | None = None
        for lam in lams:
            a, b = _LOG_DELTA_RANGE
            kl_at: dict[float, float] = {}

            def top_kl(logd: float, lam: float = lam, kl_at: dict = kl_at) -> float:
                d = self._blend_delta(push, h, Ff, lam, 10.0 ** logd)
                with self._applied(d):
                    lp1 = self._log_probs(X_top)
                val = float(np.mean(_kl(lp_top, lp1)))
                kl_at[logd] = val
                return val

            reached = False
            logd = b
            for _ in range(_BISECT_STEPS):
                logd = 0.5 * (a + b)
                val = top_kl(logd)
                if lo_t <= val <= hi_t:
                    reached = True
                    break
                if val < lo_t:
                    a = logd
                else:
                    b = logd
            if not reached:  # closest (in log KL) of the points tried
                logd = min(kl_at, key=lambda t: abs(np.log(max(kl_at[t], 1e-300) / mid_t)))
            d = self._blend_delta(push, h, Ff, lam, 10.0 ** logd)
            with self._applied(d):
                sel_kl = float(np.mean(_kl(lp_sel, self._log_probs(X_sel))))
            facts = {"lambda": float(lam), "delta": float(10.0 ** logd),
                     "top_kl": kl_at[logd], "selection_kl": sel_kl, "reached": reached}
            score = (reached, _rank_key(_safe_ratio(kl_at[logd], sel_kl)))
            if best is None or score > best[0]:
                best = (score, d, facts)
        assert best is not None
        if not best[2]["reached"]:
            warnings.warn(
                f"component {j}: no (Delta, lambda) brought the mean KL on the top examples "
                f"into kl_target={self.kl_target} (closest: {best[2]['top_kl']:.3g}); the "
                "closest is used.", UserWarning, stacklevel=3)
        return best[1], best[2]

    def _diagonal_delta_fitted(self, j: int, sign: int) -> np.ndarray:
        key = ("diag", j, sign)
        if key in self._cache:
            return self._cache[key]
        if not hasattr(self, "_fit_data"):
            raise ValueError(
                "diagonal perturbations depend on data: call fit(X, W) first (or use "
                "kl_ratio(X, component, W=...), which builds them from its arguments).")
        fd = self._fit_data
        top = np.argsort(-fd["W"][:, j], kind="stable")[: fd["n_top"]]
        X_top, X_sel = _take(fd["X"], top), _take(fd["X"], fd["select"])
        labels = None if fd["labels"] is None else np.asarray(fd["labels"])[top]
        d, facts = self._diagonal_search(j, sign, X_top, X_sel, self.dataset_fisher_, labels,
                                         self._log_probs(X_top), self._log_probs(X_sel))
        self._cache[key] = d
        self._cache[("facts", j, sign)] = facts
        return d

    # ------------------------------------------------------------------ public API
    def perturbation(self, component: int, sign: int = 1) -> np.ndarray:
        """The flat parameter perturbation ``delta`` of a component.

        Parameters
        ----------
        component : int
            Component index.
        sign : {1, -1}, default=1
            Direction.

        Returns
        -------
        delta : ndarray of shape (n_params,), float64
            In the layout's flat order. Low rank: ``||delta|| = magnitude``, orthogonal to
            every other component with ``|cos| < max_cosine``. Diagonal: the searched
            Fisher-weighted blend (needs :meth:`fit`).

        Notes
        -----
        Low rank: the projection is exact up to float64 rounding (a refinement pass
        follows the first projection). Dissimilar components that are linearly
        dependent (Gram eigenvalues below ``1e-13`` of the largest, i.e. singular values
        within ~3e-7) are treated as spanning the smaller space. When ``g_j`` itself lies
        in that span, a warning is raised and ``g_j`` is used unprojected.
        """
        j = self._component_index(component)
        sign = _check_sign(sign)
        if self.kind_ == "low_rank":
            return sign * float(self.magnitude) * self._low_rank_direction(j)
        return self._diagonal_delta_fitted(j, sign).copy()

    @contextlib.contextmanager
    def _applied(self, delta: np.ndarray) -> Iterator[None]:
        params = self._params()
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                t = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float64))
                for p, (o, s) in zip(params, zip(self.layout_.offsets, self.layout_.sizes,
                                                 strict=True), strict=True):
                    p.add_(t[o:o + s].reshape(p.shape).to(device=p.device, dtype=p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

    @contextlib.contextmanager
    def perturbed(self, component: int, sign: int = 1) -> Iterator[np.ndarray]:
        """Context manager: the model with ``delta`` added to its parameters.

        The parameters are copied on entry and restored bit for bit on exit, also when
        the block raises.

        Parameters
        ----------
        component : int
            Component index.
        sign : {1, -1}, default=1
            Direction.

        Yields
        ------
        delta : ndarray of shape (n_params,)
            The perturbation applied.

        Examples
        --------
        >>> with gp.perturbed(0, sign=-1) as delta:  # doctest: +SKIP
        ...     logits = model(X)
        """
        delta = self.perturbation(component, sign)
        with self._applied(delta):
            yield delta

    def _to_device(self, batch: Any) -> Any:
        dev = self._device()
        fdtype = self._params()[0].dtype

        def conv(v: Any) -> Any:
            v = as_tensor(v)
            if isinstance(v, torch.Tensor):
                if v.is_floating_point() and v.dtype != fdtype:
                    v = v.to(fdtype)
                return v.to(dev)
            return v

        return tree_map(conv, batch)

    def _log_probs(self, X: Any) -> np.ndarray:
        fwd = self.forward if self.forward is not None else default_forward
        out = []
        with torch.no_grad():
            for batch in iter_batches(X, int(self.batch_size)):
                logits = as_logits(fwd(self.model, self._to_device(batch)))
                out.append(logits.detach().to("cpu", torch.float64).numpy())
        if not out:
            return np.zeros((0, 0))
        # (torch's CPU log_softmax has a large per-call overhead on tiny float64 batches)
        return scipy.special.log_softmax(np.concatenate(out, axis=0), axis=1)

    def kl_divergence(self, X: Any, component: int, sign: int = 1) -> np.ndarray:
        """Per-example ``KL(p_theta(.|x) || p_{theta+delta}(.|x))``.

        Computed in batches without gradients, on the model's device, in float64 from
        the log-softmax of the logits.

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset
        component : int
        sign : {1, -1}, default=1

        Returns
        -------
        kl : ndarray of shape (n_examples,)
        """
        _n_rows(X)
        delta = self.perturbation(component, sign)
        lp0 = self._log_probs(X)
        with self._applied(delta):
            lp1 = self._log_probs(X)
        return _kl(lp0, lp1)

    def _resolve_W(self, W: Any, pefs: Any, n: int, X: Any = None) -> np.ndarray:
        r = self._components().shape[0]
        if W is None:
            from sklearn.pipeline import Pipeline

            if pefs is not None:
                W = _unwrap(self.estimator).transform(getattr(pefs, "pefs", pefs))
            elif isinstance(self.estimator, Pipeline) and X is not None:
                W = self.estimator.transform(X)  # PEFTransformer + decomposition
            else:
                raise ValueError("pass W (coefficients of X, e.g. estimator.transform of its "
                                 "PEFs) or pefs (the PEFs of X).")
        W = np.asarray(W, dtype=np.float64)
        if W.ndim != 2 or W.shape != (n, r):
            raise ValueError(f"W must have shape (n_examples, n_components) = ({n}, {r}), got "
                             f"{W.shape}.")
        if not np.all(np.isfinite(W)):
            raise ValueError("W contains NaN or infinity.")
        return W

    def kl_ratio(self, X: Any, component: int, W: np.ndarray | None = None, *,
                 pefs: Any = None, n_top: int = 128, n_baseline: int = 10000,
                 random_state: Any = None, norms: Any = None,
                 labels: Any = None) -> KLRatioResult:
        """Selectivity of a component: mean KL on its top examples over a baseline's.

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset
            Examples (held-out examples recommended).
        component : int
            Component index.
        W : ndarray of shape (n_examples, n_components), default=None
            Coefficients of ``X`` (e.g. ``estimator.transform`` of its PEFs; for a Pipeline
            estimator, ``pipeline.transform(X)`` when neither ``W`` nor ``pefs`` is given).
        pefs : sparse matrix or PEFResult, default=None
            PEFs of ``X``; ``W = estimator.transform(pefs)`` when ``W`` is omitted. A
            :class:`~sknpeff.pef.PEFResult` also supplies ``norms`` when they are omitted.
        n_top : int, default=128
            Top examples of the component (by ``W[:, component]``).
        n_baseline : int, default=10000
            Size of the random baseline set (all examples when ``X`` has fewer).
        random_state : int, RandomState instance or None, default=None
            Seeds the baseline set (and the diagonal search's selection set).
        norms : array-like of shape (n_examples,), default=None
            PEF norms before normalization (``PEFTransformer.compute(X).norms``), for the
            PEF-norm ratio.
        labels : array-like of shape (n_examples,), default=None
            True labels, for the change in accuracy on the top examples.

        Returns
        -------
        result : KLRatioResult

        Notes
        -----
        The baseline set is drawn from all examples (it may contain top examples, as a
        random sample of the data set would). For a diagonal decomposition, ``delta`` is
        searched for each sign (see the module docstring); among the values of ``lambda``
        that bring the top examples' mean KL into ``kl_target``, the one with the best
        KL ratio on a *selection set* of up to 256 examples is kept. The selection set is
        disjoint from the baseline set when ``X`` has at least 32 examples outside it;
        otherwise (``n_baseline >= n_examples``) it is a random subset of ``X`` and the
        reported ratio is slightly optimistic.
        """
        return self.kl_ratios(X, W, components=[component], pefs=pefs, n_top=n_top,
                              n_baseline=n_baseline, random_state=random_state,
                              norms=norms, labels=labels)[0]

    def kl_ratios(self, X: Any, W: np.ndarray | None = None,
                  components: Sequence[int] | None = None, *, pefs: Any = None,
                  n_top: int = 128, n_baseline: int = 10000,
                  random_state: Any = None, norms: Any = None,
                  labels: Any = None) -> KLRatioResults:
        """:meth:`kl_ratio` of several components, sharing one baseline set.

        Parameters
        ----------
        X, W, pefs, n_top, n_baseline, random_state, norms, labels
            As in :meth:`kl_ratio`.
        components : sequence of int, default=None
            Components to measure (default: all).

        Returns
        -------
        results : KLRatioResults
            One :class:`KLRatioResult` per component, with array views
            (``results.kl_ratio``, ``results.norm_ratio``, ...).
        """
        self._validate()
        n = _n_rows(X)
        if n < 2:
            raise ValueError("X must hold at least 2 examples.")
        W = self._resolve_W(W, pefs, n, X)
        r = W.shape[1]
        comps = list(range(r)) if components is None else [
            self._component_index(c) for c in components]
        n_top = _check_pos_int("n_top", n_top)
        if n_top >= n:
            raise ValueError(f"n_top must be smaller than the number of examples ({n}), got "
                             f"{n_top}.")
        n_baseline = _check_pos_int("n_baseline", n_baseline)
        if norms is None and pefs is not None and hasattr(pefs, "norms"):
            norms = pefs.norms
        if norms is not None:
            norms = np.asarray(norms, dtype=np.float64).ravel()
            if norms.shape != (n,):
                raise ValueError(f"norms must have shape ({n},), got {norms.shape}.")
        if labels is not None:
            labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape[0] != n:
                raise ValueError(f"labels must have {n} entries, got {labels.shape[0]}.")
        rng = check_random_state(random_state)
        base = np.sort(rng.choice(n, size=min(n, n_baseline), replace=False))
        tops = {j: np.argsort(-W[:, j], kind="stable")[:n_top].astype(np.int64) for j in comps}
        need = np.unique(np.concatenate([base] + list(tops.values())))
        pos = np.full(n, -1, dtype=np.int64)
        pos[need] = np.arange(need.size)
        X_need = _take(X, need)
        lp0 = self._log_probs(X_need)

        fisher = select = X_sel = lp_sel = None
        if self.kind_ == "diagonal":
            fisher = getattr(self, "dataset_fisher_", None)
            rest = np.setdiff1d(np.arange(n), base)
            pool = rest if rest.size >= 32 else np.arange(n)
            select = np.sort(rng.choice(pool, size=min(pool.size, 256), replace=False))
            if fisher is None:
                fisher = self._dataset_fisher(_take(X, base[: min(base.size, 1024)]))
            X_sel = _take(X, select)
            lp_sel = self._log_probs(X_sel)

        results = KLRatioResults()
        for j in comps:
            top = tops[j]
            per_sign = {}
            X_top = _take(X, top)
            lt = None if labels is None else labels[top]
            gsign = None if self.kind_ == "low_rank" else self._loss_grad_sign(X_top, lt)
            for sign in (1, -1):
                facts: dict = {}
                if self.kind_ == "low_rank":
                    delta = self.perturbation(j, sign)
                else:
                    delta, facts = self._diagonal_search(
                        j, sign, X_top, X_sel, fisher, lt, lp0[pos[top]], lp_sel, gsign)
                with self._applied(delta):
                    lp1 = self._log_probs(X_need)
                kl = _kl(lp0, lp1)
                tk = float(np.mean(kl[pos[top]]))
                bk = float(np.mean(kl[pos[base]]))
                acc = None
                if labels is not None:
                    y = labels[top]
                    acc = float(np.mean(lp1[pos[top]].argmax(1) == y)
                                - np.mean(lp0[pos[top]].argmax(1) == y))
                per_sign[sign] = (_safe_ratio(tk, bk), tk, bk, acc, facts)
            sign = max((1, -1), key=lambda s: _rank_key(per_sign[s][0]))
            ratio, tk, bk, acc, _ = per_sign[sign]
            norm_ratio = float("nan")
            if norms is not None:
                norm_ratio = _safe_ratio(float(np.mean(norms[top])), float(np.mean(norms[base])))
            details = {s: per_sign[s][4] for s in (1, -1)} if self.kind_ == "diagonal" else {}
            results.append(KLRatioResult(
                component=j, kl_ratio=ratio, sign=sign, top_kl=tk, baseline_kl=bk,
                norm_ratio=norm_ratio, accuracy_change=acc,
                kl_ratio_other_sign=per_sign[-sign][0], top_indices=top,
                baseline_indices=base, details=details))
        return results


def _kl(lp0: np.ndarray, lp1: np.ndarray) -> np.ndarray:
    """Row-wise ``KL(p0 || p1)`` from log-probabilities (float64, clipped at 0)."""
    p0 = np.exp(lp0)
    with np.errstate(invalid="ignore"):
        terms = np.where(p0 > 0, p0 * (lp0 - lp1), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)
