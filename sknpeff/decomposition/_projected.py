"""Whether PEFs match the random projection a fit was made under.

Components fitted on randomly projected PEFs (``PEFTransformer(compression=
"projection")``) live in that projection's space: PEFs of another projection, or
unprojected ones, have columns that mean something else. The estimators and
:class:`~sknpeff.expansion.ComponentExpander` refuse them with the same messages.
"""

from __future__ import annotations

from typing import Any

from ..utils import pef_projection, pef_tag

__all__ = ["describe_projection", "projection_mismatch"]


def describe_projection(projection: Any) -> str:
    """``"a projection (seed=.., n_components=.., n_params=..)"`` for error messages."""
    return (f"a projection (seed={projection.seed}, n_components="
            f"{projection.n_components}, n_params={projection.n_params})")


def projection_mismatch(X: Any, fitted: Any, whose: str) -> str | None:
    """Why ``X`` cannot meet components fitted under ``fitted``, or ``None`` if it can.

    Parameters
    ----------
    X : array-like or sparse matrix
        PEFs, possibly tagged with their projection
        (:func:`~sknpeff.utils.pef_projection`). An untagged matrix (a slice or a stack
        drops the tag) is not checked.
    fitted : Projection or None
        The projection of the fit (``None``: fitted on unprojected PEFs).
    whose : str
        Names the fit in the message, e.g. ``"LowRankNPEFF"``.

    Returns
    -------
    reason : str or None
        A complete error message.
    """
    desc = pef_projection(X)
    if desc is None:
        kind, _ = pef_tag(X)
        if fitted is not None and kind is not None:
            return (f"X holds unprojected PEFs, but {whose} was fitted on PEFs projected "
                    f"by {describe_projection(fitted)}: pass PEFs of the same projection "
                    "(PEFTransformer(compression='projection') with the same "
                    "projection_seed and n_values).")
        return None
    from ..pef import Projection  # the estimators import without the PEF code

    given = Projection.from_description(desc)
    if fitted is None:
        return (f"X holds PEFs projected by {describe_projection(given)}, but {whose} was "
                "fitted on unprojected PEFs (or on an untagged matrix, such as a slice, "
                "which records no projection): pass PEFs of the same kind.")
    if given.description() != fitted.description():
        return (f"X holds PEFs projected by {describe_projection(given)}, but {whose} was "
                f"fitted on PEFs projected by {describe_projection(fitted)}: a component "
                "is meaningful only under the projection it was fitted under.")
    return None
