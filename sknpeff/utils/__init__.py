"""Helpers shared by every part of sknpeff: parameter validation, thread limits, sparse
matrices.

One home for each job, so that every estimator rejects bad input with the same kind of
message and every thread setting is restored the same way.
"""

from ._sparse import PEFArray, csr_from_parts, pef_projection, pef_tag, tag_pef_matrix
from ._threads import limit_threads
from ._validation import (
    InvalidParameterError,
    check_choice,
    check_eval_mode,
    check_float,
    check_int,
)
from ._warnings import user_stacklevel

__all__ = [
    "InvalidParameterError",
    "PEFArray",
    "check_choice",
    "check_eval_mode",
    "check_float",
    "check_int",
    "csr_from_parts",
    "limit_threads",
    "pef_projection",
    "pef_tag",
    "tag_pef_matrix",
    "user_stacklevel",
]
