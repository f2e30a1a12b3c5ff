"""Where a component's mass lies among the model's parameter tensors.

Components of a fit on randomly projected PEFs (``PEFTransformer(compression=
"projection")``) live in the projected space (``h ~ R g``): both functions here bring
them back to parameter space first, by :func:`~sknpeff.pef.recover_components`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..utils import check_int
from ._validation import to_numpy

__all__ = ["top_parameters_by_component", "top_parameters_by_layer"]


def _layout_parts(layout) -> tuple[list[str], list[int], list[int], int]:
    """``(names, offsets, sizes, n_params)`` of a layout-like object, checked."""
    try:
        names = list(layout.names)
        offsets = [int(o) for o in layout.offsets]
        shapes = [tuple(int(s) for s in shape) for shape in layout.shapes]
    except (AttributeError, TypeError) as exc:
        raise ValueError(
            "layout must have names, offsets and shapes attributes (like ParameterLayout)."
        ) from exc
    if not (len(names) == len(offsets) == len(shapes)) or not names:
        raise ValueError(
            "layout.names, layout.offsets and layout.shapes must be non-empty and of equal length."
        )
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    n_params = max(o + s for o, s in zip(offsets, sizes, strict=True))
    return names, offsets, sizes, n_params


def _layer_shares(comps, offsets, sizes, squared: bool) -> np.ndarray:
    """``(r, n_tensors)`` shares of each row's mass per tensor (rows of zeros: all 0).

    ``comps`` is a dense array or a scipy sparse matrix of shape ``(r, n_params)``; it is
    read one tensor's columns at a time, in float64 (memory O(r x largest tensor)).
    """
    if hasattr(comps, "tocsc"):  # scipy sparse: column slices of CSC cost their nnz only
        comps = comps.tocsc()
    mass = np.empty((comps.shape[0], len(offsets)), dtype=np.float64)
    for t, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
        block = comps[:, o : o + s]
        if hasattr(block, "toarray"):
            block = block.tocoo()
            vals = block.data.astype(np.float64)
            vals = vals * vals if squared else np.abs(vals)
            mass[:, t] = np.bincount(block.row, weights=vals, minlength=comps.shape[0])
        else:
            block = np.asarray(block, dtype=np.float64)
            mass[:, t] = np.einsum("ij,ij->i", block, block) if squared else np.abs(block).sum(1)
    total = mass.sum(axis=1, keepdims=True)
    return np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)


def _top(shares: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-shares, kind="stable")[:k]
    return [(names[t], float(shares[t])) for t in order]


def _recover(components, projection, recovery_params) -> Any:
    """``components`` (rows in the projected space) recovered in parameter space (CSR)."""
    from ..pef import recover_components
    from ..perturbation._projected import check_recovery_params

    kwargs = check_recovery_params(recovery_params)
    try:
        return recover_components(components, projection, **kwargs)
    except TypeError as exc:
        raise ValueError(f"recovery_params: {exc}") from None


def _check_same_parameters(projection, n_params: int) -> None:
    if projection.n_params != n_params:
        raise ValueError(
            f"the projection acts on {projection.n_params} parameters but the layout has "
            f"{n_params}: pass the layout_ and projection_ of the same PEFTransformer.")


def top_parameters_by_layer(
    component_vector, layout, k: int = 5, *, squared: bool = True, projection=None,
    recovery_params: dict | None = None,
) -> list[tuple[str, float]]:
    """The parameter tensors holding the largest share of a component's mass.

    Parameters
    ----------
    component_vector : array-like of shape (n_params,) or (d,)
        A component in flat parameter space (e.g. one row of ``components_``, in the
        layout's order), or, with ``projection``, a component fitted on randomly
        projected PEFs (length ``d = projection.n_components``), which is first brought
        back to parameter space by :func:`~sknpeff.pef.recover_components`. A vector of
        length ``n_params`` is always read as already in parameter space (e.g. a row of
        a :class:`~sknpeff.perturbation.GuidedPerturber`'s ``parameter_components_``).
    layout : object or None
        Anything with ``names``, ``offsets`` and ``shapes`` attributes describing the flat
        vector (such as :class:`sknpeff.layout.ParameterLayout`): tensor ``names[t]`` of
        shape ``shapes[t]`` starts at ``offsets[t]``. ``None``: the projection's layout
        (needs ``projection``).
    k : int, default=5
        Number of tensors to return (fewer if the layout has fewer).
    squared : bool, default=True
        Mass of an entry is its square (right for LRM-NPEFF vectors ``g_k``, whose
        pseudo-Fisher diagonal is ``g_k ** 2``). Use ``squared=False`` for D-NPEFF
        components, which are already non-negative diagonals (mass = absolute value).
    projection : Projection, dict, PEFTransformer or None, default=None
        The random operator ``R`` of projected PEFs (``projection_`` of the
        ``PEFTransformer(compression="projection")`` or of the fitted estimator, or its
        description).
    recovery_params : dict or None, default=None
        Keyword arguments of :func:`~sknpeff.pef.recover_components` (e.g.
        ``{"alpha": 1e-3}``) for a projected component.

    Returns
    -------
    layers : list of (str, float)
        ``(name, share)`` pairs by descending share; shares are fractions of the total mass
        (all 0.0 for a zero vector).

    See Also
    --------
    top_parameters_by_component : The same for every component of a fitted estimator
        (recovering projected components together).

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from sknpeff.inspection import top_parameters_by_layer
    >>> layout = SimpleNamespace(names=["w", "b"], offsets=[0, 4], shapes=[(2, 2), (2,)])
    >>> top_parameters_by_layer(np.array([0, 0, 1, 0, 1, 0]), layout, k=2)
    [('w', 0.5), ('b', 0.5)]
    """
    proj = None
    if projection is not None:
        from ..perturbation._projected import find_projection

        proj = find_projection(None, None, projection)
    if layout is None:
        if proj is None:
            raise ValueError("layout must be given (e.g. the PEFTransformer's layout_); it "
                             "may be None only with a projection, whose layout is used.")
        layout = proj.layout
    names, offsets, sizes, n_params = _layout_parts(layout)
    k = check_int(k, "k", low=1)
    if hasattr(component_vector, "toarray"):  # scipy sparse row
        component_vector = component_vector.toarray()
    v = np.asarray(to_numpy(component_vector), dtype=np.float64).ravel()
    if proj is not None:
        _check_same_parameters(proj, n_params)
        if v.shape[0] != n_params and v.shape[0] == proj.n_components:
            v = _recover(v, proj, recovery_params).toarray().ravel()
    if v.shape[0] != n_params:
        d = "" if proj is None else f" or {proj.n_components} (the projection's d)"
        raise ValueError(
            f"component_vector must have length {n_params} (the layout's){d}, got "
            f"{v.shape[0]}; a component fitted on randomly projected PEFs "
            "(compression='projection') is read with projection=<PEFTransformer>."
            "projection_ (brought back by sknpeff.pef.recover_components), or use the "
            "parameter_components_ of a GuidedPerturber."
        )
    shares = _layer_shares(v[None], offsets, sizes, squared)[0]
    return _top(shares, names, k)


def top_parameters_by_component(
    estimator, layout=None, k: int = 5, *, squared: bool | None = None, projection=None,
    recovery_params: dict | None = None,
) -> list[list[tuple[str, float]]]:
    """The top parameter tensors of every component of a fitted decomposition.

    What :func:`report` takes as ``top_parameters``. A fit on randomly projected PEFs
    (its ``projection_`` set, or a Pipeline whose ``PEFTransformer(compression=
    "projection")`` step has one) is handled: its components are brought back to
    parameter space together by :func:`~sknpeff.pef.recover_components` first.

    Parameters
    ----------
    estimator : estimator, Pipeline or GuidedPerturber
        A fitted :class:`~sknpeff.decomposition.LowRankNPEFF` or
        :class:`~sknpeff.decomposition.DiagonalNPEFF`, a
        :class:`~sknpeff.expansion.ComponentExpander` of one, a Pipeline ending in one,
        or a :class:`~sknpeff.perturbation.GuidedPerturber`, whose
        ``parameter_components_`` (already recovered for a projected fit) and ``layout_``
        are used.
    layout : ParameterLayout or None, default=None
        The flat parameter order of the components (the ``PEFTransformer``'s
        ``layout_``; any object with ``names``, ``offsets`` and ``shapes``). ``None``:
        the ``layout_`` of a Pipeline's PEFTransformer step or of the GuidedPerturber,
        else the layout of the projection.
    k : int, default=5
        Number of tensors per component.
    squared : bool or None, default=None
        As in :func:`top_parameters_by_layer`; ``None``: ``True`` for a low-rank
        decomposition, ``False`` for a diagonal one.
    projection : Projection, dict, PEFTransformer or None, default=None
        The random operator of projected PEFs; ``None``: found on the estimator (its
        ``projection_``) or on a Pipeline's PEFTransformer step, as
        :class:`~sknpeff.perturbation.GuidedPerturber` finds it.
    recovery_params : dict or None, default=None
        Keyword arguments of :func:`~sknpeff.pef.recover_components`.

    Returns
    -------
    top_parameters : list of list of (str, float)
        Per component, ``(name, share)`` pairs by descending share.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.decomposition import LowRankNPEFF
    >>> from sknpeff.inspection import top_parameters_by_component
    >>> from sknpeff.layout import ParameterLayout
    >>> from sknpeff.datasets import make_planted_lowrank
    >>> X, _, _ = make_planted_lowrank(n_examples=100, n_params=60, n_classes=3,
    ...                                n_components=3, support_size=10, random_state=0)
    >>> est = LowRankNPEFF(n_components=3, n_classes=3, random_state=0).fit(X)
    >>> layout = ParameterLayout(["w", "b"], [(10, 5), (10,)])
    >>> tops = top_parameters_by_component(est, layout, k=1)
    >>> len(tops), tops[0][0][0] in ("w", "b")
    (3, True)
    """
    k = check_int(k, "k", low=1)
    if hasattr(estimator, "parameter_components_") and hasattr(estimator, "layout_"):
        if projection is not None or recovery_params is not None:
            raise ValueError(
                "projection and recovery_params apply to a fitted decomposition; a "
                "GuidedPerturber's parameter_components_ are already in parameter space "
                "(pass them to its own projection and recovery_params).")
        comps = estimator.parameter_components_
        layout = estimator.layout_ if layout is None else layout
        low_rank = getattr(estimator, "kind_", "low_rank") == "low_rank"
        proj = None
    else:
        from sklearn.utils.validation import check_is_fitted

        from ..perturbation._estimators import estimator_kind, pipeline_layout, unwrap
        from ..perturbation._projected import find_projection

        low_rank = estimator_kind(estimator) == "low_rank"
        inner = unwrap(estimator)
        check_is_fitted(inner, "components_")
        proj = find_projection(estimator, inner, projection)
        if layout is None:
            layout = pipeline_layout(estimator)
        if layout is None and proj is not None:
            layout = proj.layout
        if layout is None:
            raise ValueError("layout must be given: the layout_ of the PEFTransformer that "
                             "computed the PEFs (the estimator holds none).")
        comps = inner
    names, offsets, sizes, n_params = _layout_parts(layout)
    if proj is not None:
        if not low_rank:
            raise ValueError("projection applies to a LowRankNPEFF fitted on projected "
                             "PEFs; the estimator is a DiagonalNPEFF.")
        _check_same_parameters(proj, n_params)
        comps = _recover(comps, proj, recovery_params)  # kept_columns_ read from it
    else:
        comps = getattr(comps, "components_", comps)
        comps = comps if hasattr(comps, "tocsc") else np.asarray(to_numpy(comps))
        if comps.ndim != 2 or comps.shape[1] != n_params:
            raise ValueError(
                f"the components have shape {comps.shape} but the layout has {n_params} "
                "parameters: pass the layout_ of the PEFTransformer that computed the PEFs; "
                "for a fit on randomly projected PEFs, pass projection=<PEFTransformer>."
                "projection_ (or fit on the tagged PEFs, which sets the estimator's "
                "projection_).")
    shares = _layer_shares(comps, offsets, sizes, low_rank if squared is None else squared)
    return [_top(row, names, k) for row in shares]
