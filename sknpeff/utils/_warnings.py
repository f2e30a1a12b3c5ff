"""Warnings that point at the user's line, not at the package's."""

from __future__ import annotations

import os
import sys

__all__ = ["user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that names the first frame outside sknpeff
    and scikit-learn's wrappers (a Pipeline's ``fit``, ...): the user's call, however
    deep inside the package the warning is raised.

    Call it in the function that calls ``warnings.warn``.
    """
    import sklearn

    inside = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(sklearn.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
