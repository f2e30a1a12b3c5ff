"""Components against known concepts: purity of top examples, recall of multi-factor examples.

Both statistics take any ``(n_examples, n_components)`` non-negative coefficient matrix
(NPEFF's ``W``, a baseline's ``transform``) and a boolean matrix of known concepts, and
return them beside the same statistic for random top sets, so a number can be read
against what chance gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array

from ..utils import check_float, check_int

__all__ = ["ConceptPurity", "MultiFactorRecall", "concept_purity", "multi_factor_recall"]


def _check_inputs(W, concepts) -> tuple[np.ndarray, np.ndarray]:
    W = check_array(W, dtype=np.float64, input_name="W")
    if (W < 0).any():
        raise ValueError("W must be non-negative (a coefficient matrix).")
    C = np.asarray(concepts)
    if C.ndim != 2 or C.shape[0] != W.shape[0]:
        raise ValueError(
            f"concepts must have shape (n_examples, n_concepts) with n_examples={W.shape[0]} "
            f"(the rows of W); got shape {C.shape}."
        )
    if C.dtype != bool:
        if not np.isin(C, (0, 1)).all():
            raise ValueError("concepts must be boolean (or hold only 0 and 1).")
        C = C.astype(bool)
    return W, C


def _top_shares(C: np.ndarray, top: np.ndarray, n_top: int) -> np.ndarray:
    """``(n_sets, n_concepts)`` share of each set's examples carrying each concept.

    ``top`` is ``(n_sets, n_top)`` example indices, -1 for "no example" (a component
    with fewer than ``n_top`` positive coefficients): those count as carrying nothing.
    """
    hits = np.where((top >= 0)[:, :, None], C[np.maximum(top, 0)], False)
    return hits.sum(axis=1) / n_top


def _best(shares: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best eligible concept of each set (-1 when none is eligible) and its share."""
    if not eligible.any():
        return np.full(shares.shape[0], -1), np.zeros(shares.shape[0])
    masked = np.where(eligible[None, :], shares, -1.0)
    best = masked.argmax(axis=1)
    return best, masked[np.arange(len(best)), best]


@dataclass(frozen=True)
class ConceptPurity:
    """Purity of each component's top examples against known concepts.

    Attributes
    ----------
    best_concept : ndarray of shape (n_components,)
        The eligible concept most shared by the component's top examples (-1 when no
        concept is eligible).
    share : ndarray of shape (n_components,)
        The fraction of the component's ``n_top`` top examples carrying that concept.
    pure : ndarray of shape (n_components,)
        Whether all ``n_top`` top examples carry it.
    purity : float
        Mean of ``share``.
    pure_fraction : float
        Fraction of pure components.
    random_purity : float
        Mean best share of random sets of ``n_top`` examples (chance level of
        ``purity``).
    random_pure_fraction : float
        Fraction of random sets that are pure (chance level of ``pure_fraction``).
    base_rates : ndarray of shape (n_concepts,)
        Fraction of examples carrying each concept.
    eligible : ndarray of shape (n_concepts,)
        Concepts with a base rate below ``max_base_rate``.
    n_top : int
    """

    best_concept: np.ndarray
    share: np.ndarray
    pure: np.ndarray
    purity: float
    pure_fraction: float
    random_purity: float
    random_pure_fraction: float
    base_rates: np.ndarray
    eligible: np.ndarray
    n_top: int


def concept_purity(W, concepts, n_top: int = 16, *, max_base_rate: float = 0.5,
                   n_random: int = 200, random_state=0) -> ConceptPurity:
    """How purely each component's top examples share one known concept.

    For component ``j``, its top examples are the ``n_top`` examples of largest
    ``W[:, j]`` among those with ``W[:, j] > 0`` (a component with fewer positive
    coefficients has fewer top examples; the missing ones count as carrying no
    concept). Its *share* is the largest fraction of them carrying one concept, among
    the concepts that are not near-universal (base rate below ``max_base_rate``: a
    concept most examples carry would make any set look pure). A component is *pure*
    when its share is 1. The same statistics of uniformly random sets of ``n_top``
    examples are the chance reference.

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Non-negative coefficients (held-out ones are best).
    concepts : array-like of shape (n_examples, n_concepts)
        Boolean (or 0/1) matrix: which examples carry which known concept.
    n_top : int, default=16
        Top examples per component.
    max_base_rate : float, default=0.5
        Concepts carried by this fraction of the examples or more are not eligible.
    n_random : int, default=200
        Random sets drawn for the chance reference.
    random_state : int, RandomState instance or None, default=0
        Seed of the random sets.

    Returns
    -------
    result : ConceptPurity

    See Also
    --------
    multi_factor_recall

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import concept_purity
    >>> concepts = np.eye(3, dtype=bool).repeat(4, axis=0)       # 12 examples, 3 concepts
    >>> res = concept_purity(concepts.astype(float), concepts, n_top=4)
    >>> res.best_concept.tolist(), res.pure.tolist(), res.purity
    ([0, 1, 2], [True, True, True], 1.0)
    >>> bool(res.random_purity < 1.0)
    True
    """
    W, C = _check_inputs(W, concepts)
    n, k = W.shape
    n_top = check_int(n_top, "n_top", low=1, high=n)
    max_base_rate = check_float(max_base_rate, "max_base_rate", low=0.0, high=1.0, strict=True)
    n_random = check_int(n_random, "n_random", low=1)
    base_rates = C.mean(axis=0)
    eligible = base_rates < max_base_rate
    order = np.argsort(-W, axis=0, kind="stable")[:n_top].T  # (k, n_top)
    top = np.where(W[order, np.arange(k)[:, None]] > 0, order, -1)
    best, share = _best(_top_shares(C, top, n_top), eligible)
    rng = check_random_state(random_state)
    rand = np.argsort(rng.random_sample((n_random, n)), axis=1)[:, :n_top]
    _, rand_share = _best(_top_shares(C, rand, n_top), eligible)
    return ConceptPurity(
        best_concept=best, share=share, pure=share >= 1.0,
        purity=float(share.mean()), pure_fraction=float((share >= 1.0).mean()),
        random_purity=float(rand_share.mean()),
        random_pure_fraction=float((rand_share >= 1.0).mean()),
        base_rates=base_rates, eligible=eligible, n_top=n_top,
    )


@dataclass(frozen=True)
class MultiFactorRecall:
    """Whether examples made of several known concepts have all of them among their
    strongest components.

    Attributes
    ----------
    recall : float
        Mean over the multi-concept examples of the fraction of their concepts found
        among the labels of their strongest components.
    all_recovered : float
        Fraction of the multi-concept examples with every concept found.
    random_recall : float
        ``recall`` when each example's strongest components are replaced by a uniformly
        random set of as many components (same labels): the chance level.
    random_all_recovered : float
        ``all_recovered`` for those random sets.
    example_index : ndarray of shape (n_multi,)
        The multi-concept examples (rows of ``W``).
    example_recall : ndarray of shape (n_multi,)
        Their individual recall.
    component_concepts : ndarray of shape (n_components,)
        Each component's label: its best concept (:func:`concept_purity`), -1 for none.
    n_examples : int
        Number of multi-concept examples.
    """

    recall: float
    all_recovered: float
    random_recall: float
    random_all_recovered: float
    example_index: np.ndarray
    example_recall: np.ndarray
    component_concepts: np.ndarray
    n_examples: int


def _recall_of(sets: np.ndarray, labels: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Fraction of each example's concepts among the labels of its components ``sets``
    (``(n, m)`` component indices, -1 for none)."""
    lab = np.where(sets >= 0, labels[np.maximum(sets, 0)], -1)  # (n, m)
    n_c = C.shape[1]
    found = np.zeros(C.shape, dtype=bool)
    rows = np.repeat(np.arange(len(sets)), sets.shape[1])
    ok = lab.ravel() >= 0
    found[rows[ok], lab.ravel()[ok]] = True
    found &= C
    return found.sum(axis=1) / np.maximum(C.sum(axis=1), 1) if n_c else np.zeros(len(sets))


def multi_factor_recall(W, concepts, *, n_top: int = 16, min_concepts: int = 2,
                        n_extra: int = 0, max_base_rate: float = 0.5, n_random: int = 20,
                        random_state=0) -> MultiFactorRecall:
    """Are all the concepts of a multi-concept example among its strongest components?

    Each component is labelled by its best concept (:func:`concept_purity` of its
    ``n_top`` top examples). For each example carrying ``m >= min_concepts`` eligible
    concepts, its strongest components are the ``m + n_extra`` of largest ``W[i, :]``
    among those with ``W[i, :] > 0``; its recall is the fraction of its concepts found
    among their labels. A method that gives each example one cluster can find at most
    one concept per example (``n_extra=0``). The chance reference replaces every
    example's strongest components by a random set of as many components.

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Non-negative coefficients (held-out ones are best).
    concepts : array-like of shape (n_examples, n_concepts)
        Boolean (or 0/1) matrix of known concepts.
    n_top : int, default=16
        Top examples per component, for the labels.
    min_concepts : int, default=2
        Examples with at least this many eligible concepts are scored.
    n_extra : int, default=0
        Components beyond ``m`` allowed among an example's strongest.
    max_base_rate : float, default=0.5
        Concepts carried by this fraction of the examples or more are ignored (neither
        labels nor counted among an example's concepts).
    n_random : int, default=20
        Random draws for the chance reference.
    random_state : int, RandomState instance or None, default=0
        Seed of the random draws.

    Returns
    -------
    result : MultiFactorRecall

    See Also
    --------
    concept_purity

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import multi_factor_recall
    >>> concepts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0],
    ...                      [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]],
    ...                     dtype=bool)
    >>> additive = multi_factor_recall(concepts.astype(float), concepts, n_top=2)
    >>> one_hot = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1, 0, 2]]  # one cluster per example
    >>> clusters = multi_factor_recall(one_hot, concepts, n_top=2)
    >>> additive.recall, clusters.recall, additive.n_examples
    (1.0, 0.5, 2)
    """
    W, C = _check_inputs(W, concepts)
    n, k = W.shape
    min_concepts = check_int(min_concepts, "min_concepts", low=1)
    n_extra = check_int(n_extra, "n_extra", low=0)
    n_random = check_int(n_random, "n_random", low=1)
    pur = concept_purity(W, C, n_top, max_base_rate=max_base_rate, n_random=1,
                         random_state=random_state)
    labels = pur.best_concept
    C = C & pur.eligible[None, :]
    counts = C.sum(axis=1)
    idx = np.flatnonzero(counts >= min_concepts)
    if idx.size == 0:
        raise ValueError(
            f"no example carries {min_concepts} or more eligible concepts (base rate "
            f"below max_base_rate={max_base_rate}); nothing to score."
        )
    Wm, Cm, m = W[idx], C[idx], counts[idx] + n_extra
    width = int(min(m.max(), k))
    order = np.argsort(-Wm, axis=1, kind="stable")[:, :width]
    cols = np.arange(width)[None, :]
    keep = (cols < m[:, None]) & (np.take_along_axis(Wm, order, axis=1) > 0)
    recall = _recall_of(np.where(keep, order, -1), labels, Cm)
    rng = check_random_state(random_state)
    rand_recall = np.zeros((n_random, idx.size))
    for r in range(n_random):
        perm = np.argsort(rng.random_sample((idx.size, k)), axis=1)[:, :width]
        rand_recall[r] = _recall_of(np.where(cols < m[:, None], perm, -1), labels, Cm)
    return MultiFactorRecall(
        recall=float(recall.mean()), all_recovered=float((recall >= 1.0).mean()),
        random_recall=float(rand_recall.mean()),
        random_all_recovered=float((rand_recall >= 1.0).mean()),
        example_index=idx, example_recall=recall, component_concepts=labels,
        n_examples=int(idx.size),
    )
