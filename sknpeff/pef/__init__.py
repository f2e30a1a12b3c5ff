"""Per-example Fishers (PEFs) of a PyTorch classifier, as sparse matrices.

:class:`PEFTransformer` turns examples into PEF rows:

* low rank: row ``i`` is the flattened ``(n_classes_, n_params_)`` matrix whose slot
  ``j`` is ``a_ij = sqrt(p_j) * grad log p_j`` for the ``j``-th most probable class
  (slots of dropped classes are empty), or other vectors with the same sum of outer
  products (``class_axis``: eigenvectors of the output Fisher, random draws);
* diagonal: row ``i`` is ``f_i = sum_j a_ij ** 2``.

One batch goes through the modules of this package in order: its inputs
(``_inputs``: batching, devices, forward adapters), its class slots (``_classes``: the
logit cotangents), the engine (``_engine``: hooks, one backward pass per slot, the
exactness check), the layer rules (:mod:`sknpeff.pef.rules`, with the generic
``torch.func`` path in ``_generic`` for layers without one), the row assembly
(``_rows``), the exact top-K selection (``_topk``) and the result (``_result``).
Projected PEFs replace the last two steps by the random projection (``_projection``)
applied per layer (``_projected``); :func:`recover_components` (``_recovery``) brings
components of projected PEFs back to parameter space.
"""

from . import rules
from ._inputs import pad_token_ids
from ._projection import Projection
from ._recovery import recover_components
from ._result import PEFResult
from ._transformer import PEFTransformer
from .rules import Contribution, LayerRule, register_rule, unregister_rule

__all__ = [
    "Contribution",
    "LayerRule",
    "PEFResult",
    "PEFTransformer",
    "Projection",
    "recover_components",
    "pad_token_ids",
    "register_rule",
    "rules",
    "unregister_rule",
]
