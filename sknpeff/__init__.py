"""sknpeff: Non-Negative Per-Example Fisher Factorization for scikit-learn and PyTorch.

Public names:

* :class:`PEFTransformer` -- per-example Fishers (diagonal or low-rank) from a PyTorch model;
* :class:`DiagonalNPEFF`, :class:`LowRankNPEFF` -- the decompositions;
* :class:`GuidedPerturber` -- perturb a model along a component, KL ratios;
* :class:`ComponentExpander` -- learn new components beside frozen ones;
* :class:`ParameterLayout` -- flat parameter index <-> named tensors;
* submodules :mod:`sknpeff.inspection`, :mod:`sknpeff.datasets`, :mod:`sknpeff.io`,
  :mod:`sknpeff.backends`, :mod:`sknpeff.baselines`.
"""

from .decomposition import DiagonalNPEFF, LowRankNPEFF
from .expansion import ComponentExpander
from .layout import ParameterLayout
from .pef import PEFResult, PEFTransformer
from .perturbation import GuidedPerturber

__version__ = "0.1.0.dev0"

__all__ = [
    "ComponentExpander",
    "DiagonalNPEFF",
    "GuidedPerturber",
    "LowRankNPEFF",
    "PEFResult",
    "PEFTransformer",
    "ParameterLayout",
    "__version__",
]
