"""Layer rules: closed-form per-example gradients, one small module per layer type.

A rule turns a layer's recorded input and the class-slot cotangents at its output into
the per-example, per-class gradients of its parameters, so one backward pass of the batch
per class slot gives every example's PEF. Built in: ``Linear``, ``Conv1d``, ``Conv2d``,
``LayerNorm``, ``Embedding``, ``BatchNorm1d/2d/3d`` (eval mode). Layers without a rule
go through a generic ``torch.func`` path (exact, slower); :func:`register_rule` adds a
rule for your own layer type.
"""

from . import _conv, _embedding, _linear, _norm  # noqa: F401  (register the built-in rules)
from ._contribution import Contribution
from ._registry import (
    LayerRule,
    register_rule,
    registered_rules,
    rule_for,
    unregister_rule,
)

__all__ = [
    "Contribution",
    "LayerRule",
    "register_rule",
    "registered_rules",
    "rule_for",
    "unregister_rule",
]
