"""What a guided perturbation measures: :class:`KLRatioResult` and :class:`KLRatioResults`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["KLRatioResult", "KLRatioResults"]


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
