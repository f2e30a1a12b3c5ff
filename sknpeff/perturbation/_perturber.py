"""GuidedPerturber: perturb a model along one NPEFF component and measure the effect."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..layout import ParameterLayout
from ..pef._inputs import known_n_examples, take_rows
from ..pef._position import check_position
from ..utils import (
    InvalidParameterError,
    check_choice,
    check_eval_mode,
    check_float,
    check_int,
    user_stacklevel,
)
from ._diagonal import bisect_size, diagonal_profile, rank_key, safe_ratio, search_blend
from ._estimators import estimator_kind, pipeline_layout, pipeline_step, unwrap
from ._evaluation import applied, kl_divergence, log_probs, loss_grad_sign
from ._low_rank import component_gram, orthogonal_direction
from ._projected import find_projection, recovered_components, resolve_recovery
from ._results import KLRatioResult, KLRatioResults

__all__ = ["GuidedPerturber"]

#: mean baseline KL (nats) above which a KL ratio is outside the second-order regime
MAX_BASELINE_KL = 1.0
#: log10 range of ||delta|| searched by magnitude="auto"
LOG_NORM_RANGE = (-6.0, 3.0)
#: PEF values held at once while the dataset Fisher is streamed (bounds its memory)
_FISHER_BATCH_VALUES = 1 << 23


class _Examples:
    """Examples ``X`` with their positions when ``position`` is an array (one per
    example of ``X``), so that picking rows picks the positions alike."""

    def __init__(self, X: Any, position: Any) -> None:
        self.X = X
        self.position = position

    def take(self, idx: np.ndarray) -> _Examples:
        pos = self.position
        return _Examples(take_rows(self.X, idx),
                         pos[np.asarray(idx, dtype=np.int64)] if isinstance(pos, np.ndarray)
                         else pos)


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
        The model whose PEFs were decomposed, in eval mode (dropout would make every KL
        divergence random: a model in training mode is refused). Its parameters are
        changed only inside :meth:`perturbed` (and restored bit for bit on exit).
    layout : ParameterLayout, default=None
        The flat parameter order of the components: the ``layout_`` of the
        :class:`~sknpeff.PEFTransformer` that computed the PEFs. Default:
        ``ParameterLayout.from_model(model)`` (every parameter requiring grad), which is
        right only when the transformer used ``params=None``.
    magnitude : float or "auto", default=0.1
        Low rank: the norm of ``delta`` (paper: 0.1; 0.3 for fixing heuristics). An
        absolute norm means different things for different models (weights of norm 1
        or 100): ``"auto"`` sizes each ``delta`` instead so that the mean KL on the
        component's top examples falls in ``kl_target``, as the diagonal search does.
        The norm used is reported in each result's ``details[sign]["norm"]``, and a
        warning says when the random baseline examples move by more than 1 nat on
        average (far from the small-perturbation regime the KL ratio relies on).
    max_cosine : float, default=0.35
        Low rank: ``delta`` is made orthogonal to every other component whose ``|cos|``
        with ``g_j`` is below this (similar components are left alone so that they do not
        cancel ``g_j``). ``0`` disables the projection.
    forward : callable, default=None
        ``forward(model, batch) -> logits``, as for :class:`~sknpeff.PEFTransformer`.
        Default: the ``forward`` of a Pipeline's PEFTransformer step (the default
        forward without one).
    position : None, "last", "last_nonpad", int, str or array-like of int, default=None
        For sequence models returning per-position logits ``(batch, seq_len, vocab)``
        (language models): the position whose distribution is compared, one per
        example, exactly as for :class:`~sknpeff.PEFTransformer` (ragged token ids are
        padded per batch; ``"last_nonpad"`` reads the batches' ``attention_mask``; an
        array holds one position per example of the ``X`` passed to each method).
        Default: the ``position`` of a Pipeline's PEFTransformer step when ``forward``
        is also left to default (a ``forward`` of your own may pick the position
        itself); ``None`` otherwise.
    output : {"auto", "softmax", "sigmoid"}, default="auto"
        The distribution the logits parametrize, as for
        :class:`~sknpeff.PEFTransformer` (KL divergences of sigmoid outputs are sums of
        Bernoulli KL divergences). ``"auto"``: the ``output_`` of a Pipeline's
        PEFTransformer step; otherwise sigmoid for one logit, softmax for more.
    batch_size : int, default=32
        Examples per forward pass.
    kl_target : tuple of float, default=(0.05, 0.2)
        Diagonal, and low rank with ``magnitude="auto"``: the range the mean KL on the
        top examples is searched into.
    fisher_floor : float, default=1e-6
        Diagonal: floor on the unit-normalized dataset Fisher in ``w1`` (parameters the
        data set barely uses are pushed by the full ``Delta`` when the component uses
        them).
    n_lambda : int, default=5
        Diagonal: number of values of ``lambda`` tried (evenly spaced in log-odds over
        ``(0.035, 0.965)``); for each, ``Delta`` is found by bisection on its log.
    projection : Projection, dict, PEFTransformer or None, default=None
        For a low-rank fit on randomly projected PEFs
        (``PEFTransformer(compression="projection")``): the random operator ``R``.
        Default: the estimator's ``projection_`` when it has one, else the
        ``projection_`` of a Pipeline's PEFTransformer step. The projected components
        are brought back to parameter space once, by
        :func:`~sknpeff.pef.recover_components`, and everything else works there as
        for top-K PEFs.
    recovery_params : dict or None, default=None
        Keyword arguments of :func:`~sknpeff.pef.recover_components` (e.g.
        ``{"alpha": 1e-3, "n_nonzero": 5000}``) for a projected fit.
    recovery : {"auto", "sparse", "adjoint"}, default="auto"
        Projected fit: ``"sparse"`` recovers a sparse ``g_k`` with ``R g_k ~ h_k``
        (:func:`~sknpeff.pef.recover_components`). ``"adjoint"`` uses ``R^T h_k``: not
        ``g_k`` (it is spread over every parameter), but its effect on an example,
        ``a . R^T h_k = (R a) . h_k``, is exactly the fitted component's on the
        projected PEF, which makes more selective perturbations when the true
        ``g_k`` is not sparse enough to be recovered from ``d`` measurements.
        ``"auto"``: ``"sparse"`` while the model has at most 16 parameters per
        projected dimension (``n_params <= 16 d``), ``"adjoint"`` beyond (large models).

    Attributes
    ----------
    layout_ : ParameterLayout
        The layout used.
    forward_ : callable or None
        The ``forward`` used (``None``: the default forward).
    position_ : None, str, int or ndarray of int64
        The ``position`` used.
    kind_ : {"low_rank", "diagonal"}
        Kind of the decomposition.
    projection_ : Projection or None
        The random operator of a projected fit (``None`` for top-K PEFs).
    parameter_components_ : ndarray of shape (n_components, n_params)
        The components in the layout's flat parameter order: the estimator's
        ``components_``, or for a projected fit the recovered ones (float64).
    recovery_ : {"sparse", "adjoint"} or None
        The recovery used for a projected fit (``None`` for top-K PEFs).
    recovery_residuals_ : ndarray of shape (n_components,) or None
        Projected fit with sparse recovery: ``||R g_k - h_k|| / ||h_k||`` of each
        recovered component (large values mean ``d`` measurements did not pin ``g_k``
        down); ``None`` otherwise.
    dataset_fisher_ : ndarray of shape (n_params,)
        Diagonal only, after :meth:`fit`: the dataset-level diagonal Fisher (mean of the
        unnormalized per-example diagonal Fishers of the examples passed to ``fit``),
        accumulated while streaming: memory O(n_params) whatever ``n_fisher``.

    Notes
    -----
    Low rank with a fixed ``magnitude`` needs no data to build ``delta``. Diagonal
    perturbations depend on the component's top examples and the dataset Fisher (and
    ``magnitude="auto"`` on the top examples): call :meth:`fit` before
    :meth:`perturbation` / :meth:`perturbed` / :meth:`kl_divergence`; :meth:`kl_ratio`
    builds them from its own ``X`` and ``W`` (reusing ``dataset_fisher_`` when fitted).

    Examples
    --------
    >>> from sknpeff.datasets import make_gated_experts
    >>> from sknpeff import GuidedPerturber, LowRankNPEFF, PEFTransformer
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
                 n_lambda: int = 5, output: str = "auto", position: Any = None,
                 projection: Any = None, recovery_params: dict | None = None,
                 recovery: str = "auto") -> None:
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
        self.output = output
        self.position = position
        self.projection = projection
        self.recovery_params = recovery_params
        self.recovery = recovery
        self._validate()
        self._cache: dict = {}

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(self.model).__name__}.")
        check_eval_mode(self.model, "makes every KL divergence random")
        self.kind_ = estimator_kind(self.estimator)
        check_is_fitted(unwrap(self.estimator), "components_")
        if not (isinstance(self.magnitude, str) and self.magnitude == "auto"):
            try:
                check_float(self.magnitude, "magnitude", low=0.0, strict=True)
            except InvalidParameterError:
                raise InvalidParameterError(
                    "magnitude must be 'auto' or a finite number > 0; got "
                    f"{self.magnitude!r}.") from None
        check_float(self.fisher_floor, "fisher_floor", low=0.0, strict=True)
        check_float(self.max_cosine, "max_cosine", low=0.0, high=1.0)
        check_int(self.batch_size, "batch_size", low=1)
        check_int(self.n_lambda, "n_lambda", low=1)
        check_choice(self.output, "output", ("auto", "softmax", "sigmoid"))
        self.output_ = self.output
        if self.output == "auto":
            self.output_ = getattr(pipeline_step(self.estimator, "layout_"), "output_", "auto")
        try:
            lo, hi = (float(v) for v in self.kl_target)
        except (TypeError, ValueError):
            raise ValueError("kl_target must be a pair (low, high) of positive floats, got "
                             f"{self.kl_target!r}.") from None
        if not 0.0 < lo < hi or not np.isfinite(hi):
            raise ValueError(f"kl_target must satisfy 0 < low < high, got {self.kl_target!r}.")
        if self.forward is not None and not callable(self.forward):
            raise ValueError("forward must be None or a callable forward(model, batch).")
        self.forward_, self.position_ = self.forward, check_position(self.position)
        step = pipeline_step(self.estimator, "layout_")
        if step is not None and self.forward is None:
            # the transformer's forward and position made the PEFs; a forward of the
            # user's own replaces both (it may pick the position itself)
            self.forward_ = getattr(step, "forward", None)
            if self.position is None:
                self.position_ = check_position(getattr(step, "position", None))
        recovery = check_choice(self.recovery, "recovery", ("auto", "sparse", "adjoint"))
        proj = find_projection(self.estimator, unwrap(self.estimator), self.projection)
        if proj is not None and self.kind_ != "low_rank":
            raise ValueError("projection applies to a LowRankNPEFF fitted on projected PEFs; "
                             "the estimator is a DiagonalNPEFF.")
        layout = self.layout
        if layout is None:
            layout = pipeline_layout(self.estimator)
        if layout is None and proj is not None:
            layout = proj.layout
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
        self.projection_ = proj
        if proj is None:
            width = np.shape(unwrap(self.estimator).components_)[1]
            if width != layout.n_params:
                raise ValueError(
                    f"the estimator's components have {width} columns but the layout has "
                    f"{layout.n_params} parameters: pass layout=<PEFTransformer>.layout_ (the "
                    "same params subset the PEFs were computed on); if the PEFs were randomly "
                    "projected (compression='projection'), pass "
                    "projection=<PEFTransformer>.projection_ (or a Pipeline of the "
                    "PEFTransformer and the decomposition).")
            self.recovery_residuals_ = self.recovery_ = None
        else:
            if proj.n_params != layout.n_params or list(proj.layout.names) != list(
                    layout.names):
                raise ValueError(
                    f"the projection acts on {proj.n_params} parameters "
                    f"({len(proj.layout.names)} tensors) but the layout has "
                    f"{layout.n_params} ({len(layout.names)}): pass the layout_ and "
                    "projection_ of the same PEFTransformer.")
            self.recovery_ = resolve_recovery(recovery, proj)
            self._recovery = recovered_components(
                unwrap(self.estimator), proj, self.recovery_params, self._recovery,
                self.recovery_)
            self.recovery_residuals_ = self._recovery[1]
        self.layout_ = layout

    #: cache of the recovered components of a projected fit (see ``recovered_components``)
    _recovery: Any = None

    @property
    def parameter_components_(self) -> np.ndarray:
        """The components in the layout's flat parameter order (recovered when
        projected)."""
        return self._components()

    def _components(self) -> np.ndarray:
        if getattr(self, "projection_", None) is not None:
            return self._recovery[0][1]
        return np.asarray(unwrap(self.estimator).components_)

    def _component_index(self, component: Any) -> int:
        r = self._components().shape[0]
        if (isinstance(component, bool) or not isinstance(component, numbers.Integral)
                or not -r <= component < r):
            raise InvalidParameterError(
                f"component must be an integer in [0, {r}), got {component!r}.")
        return int(component) % r

    def _params(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        return [named[n] for n in self.layout_.names]

    def _examples(self, X: Any) -> _Examples:
        pos = self.position_
        if isinstance(pos, np.ndarray) and known_n_examples(X) != pos.shape[0]:
            raise ValueError(
                f"position holds {pos.shape[0]} positions but X has {known_n_examples(X)} "
                "examples: give one position per example of X (or a position column of "
                "dict batches).")
        return _Examples(X, pos)

    def _device(self) -> torch.device:
        return self._params()[0].device

    # ------------------------------------------------------------------- low rank
    def _low_rank_direction(self, j: int) -> np.ndarray:
        """Unit ``g_j`` made orthogonal to the dissimilar components (Gram cached for the
        current components array)."""
        G = self._components()  # (r, m), not copied
        cached = self._cache.get("gram")
        if cached is None or cached[0] is not G:
            cached = (G, component_gram(G))
            self._cache["gram"] = cached
        return orthogonal_direction(G, cached[1], j, float(self.max_cosine))

    # ------------------------------------------------------------------- diagonal
    def fit(self, X: Any, W: np.ndarray | None = None, *, pefs: Any = None,
            labels: Any = None, n_top: int = 128, n_fisher: int = 1024,
            dataset_fisher: Any = None, random_state: Any = None) -> GuidedPerturber:
        """Prepare data-dependent (diagonal) perturbations.

        Needed before :meth:`perturbation`, :meth:`perturbed` and :meth:`kl_divergence`
        for a :class:`~sknpeff.decomposition.DiagonalNPEFF` or with ``magnitude="auto"``
        (a no-op for low rank with a fixed magnitude). Records each component's top
        examples and, for diagonal, computes the dataset-level diagonal Fisher on up to
        ``n_fisher`` random examples of ``X``.

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
        n = known_n_examples(X)
        W = self._resolve_W(W, pefs, n, X)
        n_top = check_int(n_top, "n_top", low=1)
        n_fisher = check_int(n_fisher, "n_fisher", low=1)
        rng = check_random_state(random_state)
        self._cache = {}
        ex = self._examples(X)
        if self.kind_ == "diagonal":
            if dataset_fisher is None:
                fis = np.sort(rng.choice(n, size=min(n, n_fisher), replace=False))
                self.dataset_fisher_ = self._dataset_fisher(ex.take(fis))
            else:
                F = np.array(dataset_fisher, dtype=np.float64).ravel()
                if F.shape != (self.layout_.n_params,) or not np.all(np.isfinite(F)) or \
                        F.min(initial=0.0) < 0:
                    raise ValueError("dataset_fisher must be a finite non-negative vector of "
                                     f"length n_params={self.layout_.n_params}.")
                self.dataset_fisher_ = F
        self._fit_data = {"X": ex, "W": W, "labels": labels, "n_top": min(n_top, n),
                          "select": np.sort(rng.choice(n, size=min(n, 256), replace=False))}
        return self

    def _dataset_fisher(self, ex: _Examples) -> np.ndarray:
        """Mean of the unnormalized diagonal Fishers of the examples, streamed: memory is
        O(n_params) whatever the number of examples."""
        from ..pef import PEFTransformer

        m = self.layout_.n_params
        # every entry of a row is kept: a batch holds batch_size * n_params values, so
        # large models go a few examples at a time
        batch_size = max(1, min(int(self.batch_size), _FISHER_BATCH_VALUES // max(m, 1)))
        pt = PEFTransformer(self.model, kind="diagonal", n_values=m, normalize=False,
                            params=list(self.layout_.names), forward=self.forward_,
                            position=ex.position, batch_size=batch_size, dtype="float64",
                            output=self.output_)
        total = np.zeros(m, dtype=np.float64)
        n = 0
        for res in pt.fit(ex.X).iter_compute(ex.X):
            P = res.pefs
            total += np.bincount(P.indices, weights=P.data, minlength=m)
            n += P.shape[0]
        return total / max(n, 1)

    def _loss_grad_sign(self, ex: _Examples, labels: np.ndarray | None) -> np.ndarray:
        return loss_grad_sign(self.model, self.forward_, ex.X, self.batch_size,
                              self._params(), labels, self.output_, ex.position)

    def _search_args(self, j: int, sign: int, X_top: _Examples, X_sel: _Examples,
                     fisher: np.ndarray, lp_top: np.ndarray, lp_sel: np.ndarray,
                     grad_sign: np.ndarray) -> dict:
        """Arguments of :func:`search_blend` for component ``j`` (the caller runs the
        search, so that its warnings name the user's call)."""
        h, Ff = diagonal_profile(self._components()[j], fisher, self.fisher_floor,
                                 f"component {j}")

        def top_kl(d: np.ndarray) -> float:
            with self._applied(d):
                return float(np.mean(kl_divergence(lp_top, self._log_probs(X_top))))

        def selection_kl(d: np.ndarray) -> float:
            with self._applied(d):
                return float(np.mean(kl_divergence(lp_sel, self._log_probs(X_sel))))

        return dict(push=-float(sign) * grad_sign, h=h, Ff=Ff, kl_target=self.kl_target,
                    n_lambda=int(self.n_lambda), top_kl=top_kl, selection_kl=selection_kl,
                    name=f"component {j}")

    def _fitted_data(self) -> dict:
        if not hasattr(self, "_fit_data"):
            raise ValueError(
                "diagonal perturbations and magnitude='auto' depend on data: call fit(X, W) "
                "first (or use kl_ratio(X, component, W=...), which builds them from its "
                "arguments).")
        return self._fit_data

    def _diagonal_delta_fitted(self, j: int, sign: int) -> np.ndarray:
        key = ("diag", j, sign)
        if key in self._cache:
            return self._cache[key]
        fd = self._fitted_data()
        top = np.argsort(-fd["W"][:, j], kind="stable")[: fd["n_top"]]
        X_top, X_sel = fd["X"].take(top), fd["X"].take(fd["select"])
        labels = None if fd["labels"] is None else np.asarray(fd["labels"])[top]
        d, facts = search_blend(**self._search_args(
            j, sign, X_top, X_sel, self.dataset_fisher_, self._log_probs(X_top),
            self._log_probs(X_sel), self._loss_grad_sign(X_top, labels)))
        self._cache[key] = d
        self._cache[("facts", j, sign)] = facts
        return d

    def _calibrated(self, j: int, sign: int, X_top: _Examples, lp_top: np.ndarray
                    ) -> tuple[np.ndarray, dict]:
        """Low rank, ``magnitude="auto"``: ``delta`` along the projected direction, sized
        so that the mean KL on the top examples falls in ``kl_target``."""
        d = sign * self._low_rank_direction(j)

        def top_kl(size: float) -> float:
            with self._applied(size * d):
                return float(np.mean(kl_divergence(lp_top, self._log_probs(X_top))))

        size, kl, reached = bisect_size(top_kl, self.kl_target, LOG_NORM_RANGE)
        if not reached:
            warnings.warn(
                f"component {j}: no ||delta|| in [1e-6, 1e3] brought the mean KL on the top "
                f"examples into kl_target={self.kl_target} (closest: {kl:.3g}); the closest "
                "is used.", UserWarning, stacklevel=user_stacklevel())
        return size * d, {"top_kl": kl, "reached": reached}

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
        sign = check_choice(sign, "sign", (1, -1))
        if self.kind_ == "low_rank" and self.magnitude != "auto":
            return sign * float(self.magnitude) * self._low_rank_direction(j)
        if self.kind_ == "low_rank":
            key = ("auto", j, sign)
            if key not in self._cache:
                fd = self._fitted_data()
                top = np.argsort(-fd["W"][:, j], kind="stable")[: fd["n_top"]]
                X_top = fd["X"].take(top)
                self._cache[key] = self._calibrated(j, sign, X_top, self._log_probs(X_top))[0]
            return self._cache[key].copy()
        return self._diagonal_delta_fitted(j, sign).copy()

    def _applied(self, delta: np.ndarray):
        return applied(self._params(), self.layout_, delta)

    @contextmanager
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

    def _log_probs(self, ex: _Examples) -> np.ndarray:
        check_eval_mode(self.model, "makes every KL divergence random")
        return log_probs(self.model, self.forward_, ex.X, self.batch_size, self._params(),
                         self.output_, ex.position)

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
        known_n_examples(X)
        if isinstance(X, torch.utils.data.DataLoader):
            raise ValueError(
                "kl_divergence compares each example before and after the perturbation: "
                "pass the examples themselves (a tensor, array, dict, list or Dataset), "
                "not a DataLoader, whose batches may come in another order at each pass.")
        ex = self._examples(X)
        delta = self.perturbation(component, sign)
        lp0 = self._log_probs(ex)
        with self._applied(delta):
            lp1 = self._log_probs(ex)
        return kl_divergence(lp0, lp1)

    def _resolve_W(self, W: Any, pefs: Any, n: int, X: Any = None) -> np.ndarray:
        r = self._components().shape[0]
        if W is None:
            from sklearn.pipeline import Pipeline

            if pefs is not None:
                W = unwrap(self.estimator).transform(getattr(pefs, "pefs", pefs))
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
        n = known_n_examples(X)
        if n < 2:
            raise ValueError("X must hold at least 2 examples.")
        W = self._resolve_W(W, pefs, n, X)
        r = W.shape[1]
        comps = list(range(r)) if components is None else [
            self._component_index(c) for c in components]
        n_top = check_int(n_top, "n_top", low=1)
        if n_top >= n:
            raise ValueError(f"n_top must be smaller than the number of examples ({n}), got "
                             f"{n_top}.")
        n_baseline = check_int(n_baseline, "n_baseline", low=1)
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
        ex = self._examples(X)
        X_need = ex.take(need)
        lp0 = self._log_probs(X_need)

        fisher = select = X_sel = lp_sel = None
        if self.kind_ == "diagonal":
            fisher = getattr(self, "dataset_fisher_", None)
            rest = np.setdiff1d(np.arange(n), base)
            pool = rest if rest.size >= 32 else np.arange(n)
            select = np.sort(rng.choice(pool, size=min(pool.size, 256), replace=False))
            if fisher is None:
                fisher = self._dataset_fisher(ex.take(base[: min(base.size, 1024)]))
            X_sel = ex.take(select)
            lp_sel = self._log_probs(X_sel)

        results = KLRatioResults()
        for j in comps:
            top = tops[j]
            per_sign = {}
            X_top = ex.take(top)
            lt = None if labels is None else labels[top]
            gsign = None if self.kind_ == "low_rank" else self._loss_grad_sign(X_top, lt)
            for sign in (1, -1):
                facts: dict = {}
                if self.kind_ == "low_rank" and self.magnitude == "auto":
                    delta, facts = self._calibrated(j, sign, X_top, lp0[pos[top]])
                elif self.kind_ == "low_rank":
                    delta = self.perturbation(j, sign)
                else:
                    delta, facts = search_blend(**self._search_args(
                        j, sign, X_top, X_sel, fisher, lp0[pos[top]], lp_sel, gsign))
                with self._applied(delta):
                    lp1 = self._log_probs(X_need)
                kl = kl_divergence(lp0, lp1)
                tk = float(np.mean(kl[pos[top]]))
                bk = float(np.mean(kl[pos[base]]))
                facts["norm"] = float(np.linalg.norm(delta))
                acc = None
                if labels is not None:
                    y = labels[top]
                    acc = float(np.mean(lp1[pos[top]].argmax(1) == y)
                                - np.mean(lp0[pos[top]].argmax(1) == y))
                per_sign[sign] = (safe_ratio(tk, bk), tk, bk, acc, facts)
            sign = max((1, -1), key=lambda s: rank_key(per_sign[s][0]))
            ratio, tk, bk, acc, _ = per_sign[sign]
            norm_ratio = float("nan")
            if norms is not None:
                norm_ratio = safe_ratio(float(np.mean(norms[top])), float(np.mean(norms[base])))
            details = {s: per_sign[s][4] for s in (1, -1)}
            if bk > MAX_BASELINE_KL:
                warnings.warn(
                    f"component {j}: the perturbation moves the random baseline examples by "
                    f"{bk:.3g} nats of KL on average (||delta|| = {details[sign]['norm']:.3g}):"
                    " far beyond the small-perturbation regime where KL ~ delta^T F delta / 2,"
                    " so the KL ratio says little about the component. Use a smaller "
                    "magnitude, or magnitude='auto' (sized to kl_target on the top "
                    "examples).", UserWarning, stacklevel=user_stacklevel())
            results.append(KLRatioResult(
                component=j, kl_ratio=ratio, sign=sign, top_kl=tk, baseline_kl=bk,
                norm_ratio=norm_ratio, accuracy_change=acc,
                kl_ratio_other_sign=per_sign[-sign][0], top_indices=top,
                baseline_indices=base, details=details))
        return results
