"""scikit-learn's own estimator checks for both decomposition estimators, with defaults."""

import warnings

from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF


@parametrize_with_checks([DiagonalNPEFF(), LowRankNPEFF()])
def test_sklearn_compatible_estimator(estimator, check):
    with warnings.catch_warnings():
        # tiny random check data rarely converge within max_iter; that is not a failure
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_shared_docstring_paragraphs_filled_in():
    # paragraphs both estimators state word for word are written once (SHARED_DOCS)
    import inspect
    import re

    from sknpeff.decomposition._docs import SHARED_DOCS

    for est in (DiagonalNPEFF, LowRankNPEFF):
        assert not re.search(r"^\s*\{\w+\}$", est.__doc__, flags=re.MULTILINE)
        for text in SHARED_DOCS.values():
            assert text in inspect.cleandoc(est.__doc__)
