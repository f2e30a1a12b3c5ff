"""NPEFF decompositions: :class:`DiagonalNPEFF` and :class:`LowRankNPEFF`."""

from ._diagonal import DiagonalNPEFF
from ._low_rank import LowRankNPEFF

__all__ = ["DiagonalNPEFF", "LowRankNPEFF"]
