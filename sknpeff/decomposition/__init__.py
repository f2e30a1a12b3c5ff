"""NPEFF decompositions: :class:`DiagonalNPEFF` and :class:`LowRankNPEFF`."""

from ._low_rank import LowRankNPEFF

__all__ = ["LowRankNPEFF"]
