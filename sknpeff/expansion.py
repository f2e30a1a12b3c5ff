"""Component-set expansion: learn new NPEFF components beside frozen ones (paper section 3.5).

A decomposition fitted on general data takes the model's general processing. Fitting more
components on a specialised set (e.g. the misclassified examples) while the first ones stay
frozen lets the new components specialise to what the old ones do not explain.

Components fitted on randomly projected PEFs live in the projected space of one random
operator ``R``: the new components are learned in that same space, so the specialised
PEFs must be projected by the same ``R`` (checked through the PEF matrix's tag), and the
expanded estimator carries ``R`` as its ``projection_``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from .backends import cupy_device, to_device
from .decomposition._projected import projection_mismatch
from .utils import check_int

__all__ = ["ComponentExpander"]

_OWN_PARAMS = ("estimator", "n_new_components")


def _takes_frozen(est: Any) -> bool:
    """Whether ``est.fit_transform`` takes the ``frozen_components`` keyword."""
    method = getattr(est, "fit_transform", None)
    if not callable(method):
        return False
    try:
        return "frozen_components" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class ComponentExpander(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Add ``n_new_components`` components to a fitted NPEFF estimator, the old ones frozen.

    ``fit(X)`` clones ``estimator``, sets ``n_components = r0 + n_new_components`` (and
    ``fit_params``) on the clone and fits it on ``X`` with the estimators' frozen-components
    protocol, ``fit_transform(X, frozen_components=estimator.components_)``: the first
    ``r0`` rows of its components are ``estimator.components_`` bit for bit and never
    updated, the new rows and the coefficients over all components are learned.
    ``estimator`` itself is never modified.

    Parameters
    ----------
    estimator : LowRankNPEFF or DiagonalNPEFF
        A fitted decomposition whose ``fit_transform`` takes ``frozen_components``
        (see :meth:`LowRankNPEFF.fit_transform
        <sknpeff.decomposition.LowRankNPEFF.fit_transform>`).
    n_new_components : int, default=8
        Number of components to learn (the paper used 64 on misclassified examples).
    **fit_params
        Parameters set on the clone before fitting (e.g. ``max_iter=300``,
        ``random_state=0``); any parameter of ``estimator`` except ``n_components``.
        They are parameters of the expander too (``get_params`` / ``set_params``).

    Attributes
    ----------
    estimator_ : estimator
        The fitted expanded clone (``r0 + n_new_components`` components).
    components_ : ndarray of shape (r0 + n_new_components, n_params)
        The frozen components first, then the new ones.
    frozen_ : ndarray of bool of shape (r0 + n_new_components,)
        ``True`` for the frozen components.
    n_frozen_ : int
        ``r0``.
    n_components_ : int
        ``r0 + n_new_components``.
    n_features_in_ : int
        Width of the PEF rows.
    projection_ : Projection or None
        The random projection of the PEFs the components live in: ``estimator``'s
        ``projection_`` (``None`` for unprojected PEFs, or an estimator without one).

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_lowrank
    >>> from sknpeff.decomposition import LowRankNPEFF
    >>> from sknpeff.expansion import ComponentExpander
    >>> X, _, _ = make_planted_lowrank(n_examples=200, n_params=500, n_classes=3,
    ...                                n_components=6, support_size=50, random_state=0)
    >>> base = LowRankNPEFF(n_components=4, n_classes=3, random_state=0).fit(X)
    >>> exp = ComponentExpander(base, n_new_components=2, random_state=0).fit(X[:100])
    >>> exp.components_.shape, int(exp.frozen_.sum())
    ((6, 500), 4)
    >>> bool((exp.components_[:4] == base.components_).all())
    True
    >>> exp.transform(X).shape
    (200, 6)
    """

    def __init__(self, estimator: Any, n_new_components: int = 8, **fit_params: Any) -> None:
        self.estimator = estimator
        self.n_new_components = n_new_components
        self._fit_params = dict(fit_params)

    # ---------------------------------------------------------- sklearn params
    def get_params(self, deep: bool = True) -> dict:
        """Parameters of the expander: ``estimator``, ``n_new_components`` and fit_params.

        Parameters
        ----------
        deep : bool, default=True
            Also return ``estimator__<name>`` entries for the estimator's parameters.

        Returns
        -------
        params : dict
        """
        params = {"estimator": self.estimator, "n_new_components": self.n_new_components}
        params.update(self._fit_params)
        if deep and hasattr(self.estimator, "get_params"):
            for k, v in self.estimator.get_params(deep=True).items():
                params[f"estimator__{k}"] = v
        return params

    def set_params(self, **params: Any) -> ComponentExpander:
        """Set parameters; names other than ``estimator``/``n_new_components`` (and
        ``estimator__<name>``) become fit_params.

        Returns
        -------
        self : ComponentExpander
        """
        nested = {k.split("__", 1)[1]: v for k, v in params.items()
                  if k.startswith("estimator__")}
        for key, value in params.items():
            if key.startswith("estimator__"):
                continue
            if key in _OWN_PARAMS:
                setattr(self, key, value)
            else:
                self._fit_params[key] = value
        if nested:
            self.estimator.set_params(**nested)
        return self

    # --------------------------------------------------------------------- fit
    def _check(self) -> tuple[np.ndarray, dict]:
        check_int(self.n_new_components, "n_new_components", low=1)
        est = self.estimator
        if not hasattr(est, "get_params") or not callable(getattr(est, "fit", None)):
            raise ValueError(f"estimator must be a fitted NPEFF estimator; got "
                             f"{type(est).__name__}.")
        if not _takes_frozen(est):
            raise ValueError(
                f"estimator {type(est).__name__} cannot be expanded: its fit_transform "
                "takes no frozen_components.")
        check_is_fitted(est, "components_")
        fit_params = dict(self._fit_params)
        if "n_components" in fit_params:
            raise ValueError("n_components cannot be a fit_param: it is set to "
                             "estimator.n_components_ + n_new_components.")
        unknown = sorted(set(fit_params) - set(est.get_params(deep=False)))
        if unknown:
            raise ValueError(f"fit_params not accepted by {type(est).__name__}: {unknown}.")
        return np.array(est.components_, copy=True), fit_params

    def _frozen_projection(self, X: Any) -> Any:
        """The estimator's projection (a Projection, or None), after checking that ``X``
        holds PEFs of the same projection: the frozen components mean something only
        under the projection they were fitted under."""
        est = self.estimator
        if not hasattr(est, "projection_"):  # an estimator that records no projection
            return None
        fitted = est.projection_
        if fitted is not None:
            from .pef import Projection  # torch only where PEFs were projected

            fitted = Projection.from_description(fitted)
        reason = projection_mismatch(X, fitted, f"the {type(est).__name__} to expand")
        if reason is not None:
            raise ValueError(reason)
        return fitted

    def fit(self, X: Any, y: Any = None) -> ComponentExpander:
        """Learn ``n_new_components`` components on ``X`` beside the frozen ones.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
            PEFs of the specialised set, in the estimator's layout.
        y : ignored

        Returns
        -------
        self : ComponentExpander
        """
        self.fit_transform(X)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit (see :meth:`fit`) and return the coefficients of ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
        y : ignored

        Returns
        -------
        W : ndarray of shape (n_examples, r0 + n_new_components)
            A CuPy array on ``X``'s device when ``X`` is a CuPy array or sparse matrix.

        Raises
        ------
        KeyboardInterrupt
            On Ctrl-C during the fit, once the state fitted so far is stored (as the
            estimator does).
        """
        frozen, fit_params = self._check()
        projection = self._frozen_projection(X)
        r0 = frozen.shape[0]
        est = clone(self.estimator)
        est.set_params(n_components=r0 + int(self.n_new_components), **fit_params)
        try:
            W = est.fit_transform(X, frozen_components=frozen)
        except KeyboardInterrupt:
            # the estimator kept the state fitted so far (and warned): keep it here too
            if hasattr(est, "components_"):
                self._store(est, frozen, projection)
            raise
        self._store(est, frozen, projection)
        # like transform and the estimators: CuPy input gives CuPy output on its device
        # (the estimator returns it so already)
        return to_device(W, cupy_device(X))

    def _store(self, est: Any, frozen: np.ndarray, projection: Any) -> None:
        """Check that ``est`` kept ``frozen`` bit for bit and take its fitted state."""
        r0 = frozen.shape[0]
        comps = np.asarray(est.components_)
        if comps.shape[0] != r0 + self.n_new_components or not np.array_equal(
                comps[:r0], frozen.astype(comps.dtype)):
            raise RuntimeError(
                f"{type(est).__name__}.fit_transform did not keep the frozen components "
                "unchanged.")
        if comps.dtype != frozen.dtype and not np.array_equal(comps[:r0].astype(frozen.dtype),
                                                              frozen):
            raise ValueError(
                f"the frozen components ({frozen.dtype}) do not survive the cast to X's "
                f"dtype ({comps.dtype}) bit for bit: pass X in {frozen.dtype}.")
        if hasattr(self.estimator, "projection_"):
            # the clone recorded X's tag, which an untagged slice lacks: the components
            # live in the frozen ones' space whatever the tag
            est.projection_ = projection
        self.estimator_ = est
        self.projection_ = getattr(est, "projection_", None)
        self.components_ = comps
        self.frozen_ = np.arange(comps.shape[0]) < r0
        self.n_frozen_ = r0
        self.n_components_ = comps.shape[0]
        self._n_features_out = comps.shape[0]
        self.n_features_in_ = est.n_features_in_
        if hasattr(est, "feature_names_in_"):
            self.feature_names_in_ = est.feature_names_in_

    # --------------------------------------------------------------- transform
    def transform(self, X: Any) -> np.ndarray:
        """Coefficients of ``X`` over the frozen and the new components.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)

        Returns
        -------
        W : ndarray of shape (n_examples, r0 + n_new_components)
        """
        check_is_fitted(self, "estimator_")
        return self.estimator_.transform(X)

    def score(self, X: Any, y: Any = None) -> float:
        """The expanded estimator's score (negative loss) of ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
        y : ignored

        Returns
        -------
        score : float
        """
        check_is_fitted(self, "estimator_")
        return self.estimator_.score(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.requires_fit = True
        return tags
