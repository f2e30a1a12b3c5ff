"""Where a component's mass lies among the model's parameter tensors."""

from __future__ import annotations

import numpy as np

from ..utils import check_int
from ._validation import to_numpy

__all__ = ["top_parameters_by_layer"]


def top_parameters_by_layer(
    component_vector, layout, k: int = 5, *, squared: bool = True
) -> list[tuple[str, float]]:
    """The parameter tensors holding the largest share of a component's mass.

    Parameters
    ----------
    component_vector : array-like of shape (n_params,)
        A component in flat parameter space (e.g. one row of ``components_``, in the
        layout's order; for a fit on projected PEFs, a row of
        :func:`~sknpeff.pef.recover_components` or of a
        :class:`~sknpeff.perturbation.GuidedPerturber`'s ``parameter_components_``).
    layout : object
        Anything with ``names``, ``offsets`` and ``shapes`` attributes describing the flat
        vector (such as :class:`sknpeff.layout.ParameterLayout`): tensor ``names[t]`` of
        shape ``shapes[t]`` starts at ``offsets[t]``.
    k : int, default=5
        Number of tensors to return (fewer if the layout has fewer).
    squared : bool, default=True
        Mass of an entry is its square (right for LRM-NPEFF vectors ``g_k``, whose
        pseudo-Fisher diagonal is ``g_k ** 2``). Use ``squared=False`` for D-NPEFF
        components, which are already non-negative diagonals (mass = absolute value).

    Returns
    -------
    layers : list of (str, float)
        ``(name, share)`` pairs by descending share; shares are fractions of the total mass
        (all 0.0 for a zero vector).

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from sknpeff.inspection import top_parameters_by_layer
    >>> layout = SimpleNamespace(names=["w", "b"], offsets=[0, 4], shapes=[(2, 2), (2,)])
    >>> top_parameters_by_layer(np.array([0, 0, 1, 0, 1, 0]), layout, k=2)
    [('w', 0.5), ('b', 0.5)]
    """
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
    if hasattr(component_vector, "toarray"):  # scipy sparse row
        component_vector = component_vector.toarray()
    v = np.asarray(to_numpy(component_vector), dtype=np.float64).ravel()
    if v.shape[0] != n_params:
        raise ValueError(
            f"component_vector must have length {n_params} (the layout's), got {v.shape[0]}"
            "; a component fitted on randomly projected PEFs (compression='projection') "
            "must first be brought back to parameter space: sknpeff.pef.recover_components, "
            "or the parameter_components_ of a GuidedPerturber."
        )
    k = check_int(k, "k", low=1)
    mass = v * v if squared else np.abs(v)
    per_layer = np.array(
        [mass[o : o + s].sum() for o, s in zip(offsets, sizes, strict=True)], dtype=np.float64
    )
    total = per_layer.sum()
    shares = per_layer / total if total > 0 else np.zeros_like(per_layer)
    order = np.argsort(-shares, kind="stable")[:k]
    return [(names[t], float(shares[t])) for t in order]

