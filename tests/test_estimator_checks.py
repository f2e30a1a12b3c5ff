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
