"""What the perturber reads from the estimator it is given: the decomposition behind a
Pipeline or a ComponentExpander, its kind, and the Pipeline's PEFTransformer step."""

from __future__ import annotations

from typing import Any

from ..layout import ParameterLayout

__all__ = ["estimator_kind", "pipeline_layout", "pipeline_step", "unwrap"]


def unwrap(estimator: Any) -> Any:
    """The decomposition behind a Pipeline or a ComponentExpander."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        estimator = estimator[-1]
    inner = getattr(estimator, "estimator_", None)
    if inner is not None and hasattr(inner, "components_"):
        return inner
    return estimator


def pipeline_step(estimator: Any, attribute: str) -> Any:
    """The first step of a fitted Pipeline (before the last) that has ``attribute``."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps[:-1]:
            if hasattr(step, attribute):
                return step
    return None


def pipeline_layout(estimator: Any) -> ParameterLayout | None:
    """The ``layout_`` of a fitted Pipeline's PEFTransformer step, if any."""
    layout = getattr(pipeline_step(estimator, "layout_"), "layout_", None)
    return layout if isinstance(layout, ParameterLayout) else None


def estimator_kind(estimator: Any) -> str:
    """``"low_rank"`` or ``"diagonal"``: the kind of the decomposition behind ``estimator``."""
    from ..decomposition import DiagonalNPEFF, LowRankNPEFF

    inner = unwrap(estimator)
    if isinstance(inner, LowRankNPEFF):
        return "low_rank"
    if isinstance(inner, DiagonalNPEFF):
        return "diagonal"
    raise ValueError(
        "estimator must be a fitted LowRankNPEFF or DiagonalNPEFF (or a Pipeline ending in "
        "one, or a ComponentExpander of one); got "
        f"{type(estimator).__name__}.")
