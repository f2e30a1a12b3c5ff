"""The registry of layer rules: which layer types have closed-form per-example gradients."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._contribution import Contribution

__all__ = ["LayerRule", "register_rule", "registered_rules", "rule_for", "unregister_rule"]


class LayerRule(ABC):
    """How the per-example gradients of one layer type's parameters follow from its input
    and the cotangents at its output.

    For a layer ``y = f(x; theta)`` applied to a batch, with ``g`` the gradient of one
    scalar per (class slot, example) with respect to ``y``, a rule returns, for every
    parameter it is asked for, the per-example, per-class-slot gradients with respect to
    that parameter. The engine records each hooked layer's input and output in one
    forward pass of the batch, back-propagates the class-slot cotangents to the layer
    outputs only, and calls the rule. Results are checked exactly on the first batch of
    every computation (a random mix of the per-example gradients must equal one ordinary
    backward pass); a parameter whose rule fails the check goes to a generic, slower
    path.

    Subclass it and override :meth:`contributions` (and optionally the other methods),
    then :func:`register_rule` an instance for your layer type. A plain function is
    enough for most layers: see :func:`register_rule`.

    Attributes
    ----------
    expand_shared_batch : bool
        The layer may be called once on an input shared by the whole batch (leading axis
        of size 1, broadcast later: e.g. position embeddings of ``arange(T)[None]``). The
        engine then gives every example its own copy, so that its gradient stays per
        example. Safe only for layers whose output for a repeated input is the repeated
        output (element-wise or row-wise maps).
    """

    expand_shared_batch: bool = False

    def supports(self, module: nn.Module) -> bool:
        """Whether this rule applies to ``module`` (e.g. given its options).

        Parameters
        ----------
        module : torch.nn.Module
            A module of the registered type.

        Returns
        -------
        supported : bool
            ``False`` sends the module's parameters to the generic path.
        """
        return True

    def per_class(self, module: nn.Module, x: torch.Tensor) -> bool:
        """Whether :meth:`contributions` takes the cotangents as a list (one tensor per
        class slot) instead of one stacked ``(c, B, ...)`` tensor.

        Stacking costs a copy of the layer's output times ``c``; rules whose products
        can be done class by class cheaply may avoid it.
        """
        return False

    def per_batch(self, module: nn.Module, x: torch.Tensor, g: list[torch.Tensor],
                  wanted: frozenset[str]) -> dict[str, torch.Tensor]:
        """Terms computed once per batch, for a module that takes per-class cotangents.

        Called only when :meth:`per_class` is true. The engine slices each returned
        tensor ``(c, B, ...)`` along its second axis to the row chunk it processes and
        passes them to :meth:`contributions` as ``batch_terms``.
        """
        return {}

    @abstractmethod
    def contributions(self, module: nn.Module, x: torch.Tensor,
                      g: torch.Tensor | list[torch.Tensor], wanted: frozenset[str],
                      batch_terms: Mapping[str, torch.Tensor]
                      ) -> dict[str, Contribution]:
        """Per-example, per-class gradients of the wanted parameters of ``module``.

        Parameters
        ----------
        module : torch.nn.Module
            The layer.
        x : torch.Tensor
            Its input for a chunk of ``Bc`` examples, batch axis first.
        g : torch.Tensor or list of torch.Tensor
            Cotangents at its output: ``(c, Bc, *output.shape[1:])``, or (when
            :meth:`per_class` is true) a list of ``c`` tensors ``(Bc, *output.shape[1:])``.
        wanted : frozenset of str
            Names of the module's own parameters (``"weight"``, ``"bias"``, ...) to return.
        batch_terms : mapping of str to torch.Tensor
            What :meth:`per_batch` returned, sliced to the chunk.

        Returns
        -------
        contributions : dict of str to Contribution
            One entry per wanted parameter that gets a gradient from this layer.
        """


class FunctionRule(LayerRule):
    """A rule given as a function ``fn(module, x, g) -> {name: gradients}``.

    ``g`` is ``(c, B, *output.shape[1:])``; each returned tensor is
    ``(c, B, *param.shape)`` (or a :class:`Contribution`).
    """

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                    Mapping[str, Any]]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"FunctionRule({getattr(self.fn, '__qualname__', self.fn)!r})"

    def contributions(self, module, x, g, wanted, batch_terms):
        c, Bc = g.shape[0], g.shape[1]
        out = {}
        for name, t in self.fn(module, x, g).items():
            if name not in wanted:
                continue
            if not isinstance(t, Contribution):
                numel = getattr(module, name).numel()
                if not isinstance(t, torch.Tensor) or t.numel() != c * Bc * numel:
                    raise ValueError(
                        f"the rule {self!r} for {type(module).__name__} returned "
                        f"{getattr(t, 'shape', type(t).__name__)} for parameter {name!r}; "
                        f"expected a tensor of shape (c={c}, batch={Bc}, "
                        f"*{tuple(getattr(module, name).shape)}) or a Contribution."
                    )
                t = Contribution.dense(t.reshape(c, Bc, numel))
            out[name] = t
        return out


_RULES: dict[type, LayerRule] = {}


def register_rule(layer_type: type, rule: LayerRule | Callable | None = None, *,
                  overwrite: bool = False):
    """Register the per-example gradient rule of a layer type.

    Layers without a rule are handled by a generic ``torch.func`` path (``vmap`` of
    ``vjp`` of the whole model): exact, but slower. A rule makes your layer as fast as
    the built-in ones (``Linear``, ``Conv1d``/``Conv2d``, ``LayerNorm``, ``Embedding``,
    ``BatchNorm`` in eval mode).

    A rule applies to instances of ``layer_type`` and of its subclasses that do not
    override ``forward`` (a subclass with its own ``forward`` needs its own rule). Every
    rule is checked exactly on the first batch of each computation; parameters whose
    gradients do not match go to the generic path with a warning.

    Parameters
    ----------
    layer_type : type
        A subclass of :class:`torch.nn.Module`.
    rule : LayerRule or callable, default=None
        A :class:`LayerRule`, or a function ``rule(module, x, grad_output)`` returning a
        dict from the names of the module's own parameters to their per-example,
        per-class gradients: ``x`` is the module's input ``(B, ...)``, ``grad_output``
        the cotangents at its output, ``(c, B, *output.shape[1:])`` (``c`` class slots),
        and each returned tensor has shape ``(c, B, *param.shape)``. ``None``: return a
        decorator.
    overwrite : bool, default=False
        Replace a rule already registered for ``layer_type`` (built-in ones included).

    Returns
    -------
    rule or decorator
        The registered rule (as given), or a decorator that registers a function.

    Examples
    --------
    A layer that scales its input feature-wise, ``y = x * scale``:

    >>> import torch
    >>> from sknpeff.pef.rules import register_rule, unregister_rule
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.scale = torch.nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.scale
    >>> @register_rule(Scale)
    ... def scale_rule(module, x, grad_output):
    ...     # d<g, x * s>/ds = sum over all axes but the last of g * x
    ...     gx = grad_output * x[None]
    ...     return {"scale": gx.reshape(*gx.shape[:2], -1, x.shape[-1]).sum(2)}
    >>> from sknpeff import PEFTransformer
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), Scale(4),
    ...                             torch.nn.Linear(4, 2)).eval()
    >>> pefs = PEFTransformer(model, kind="low_rank", n_values=8).fit_transform(
    ...     torch.randn(5, 3))
    >>> pefs.shape  # 2 class slots x 30 parameters
    (5, 60)
    >>> _ = unregister_rule(Scale)  # leave the registry as it was
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ValueError(
            f"layer_type must be a subclass of torch.nn.Module; got {layer_type!r}.")

    def register(r):
        if isinstance(r, LayerRule):
            wrapped = r
        elif callable(r):
            wrapped = FunctionRule(r)
        else:
            raise ValueError(
                "rule must be a LayerRule or a callable rule(module, x, grad_output); got "
                f"{type(r).__name__}.")
        if layer_type in _RULES and not overwrite:
            raise ValueError(
                f"a rule for {layer_type.__name__} is already registered "
                f"({_RULES[layer_type]!r}); pass overwrite=True to replace it.")
        _RULES[layer_type] = wrapped
        return r

    return register if rule is None else register(rule)


def unregister_rule(layer_type: type) -> LayerRule:
    """Remove the rule of ``layer_type`` and return it.

    Raises
    ------
    KeyError
        If no rule is registered for ``layer_type``.
    """
    try:
        return _RULES.pop(layer_type)
    except KeyError:
        raise KeyError(f"no rule is registered for {layer_type!r}.") from None


def registered_rules() -> dict[type, LayerRule]:
    """A copy of the registry: layer type -> rule."""
    return dict(_RULES)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule that computes ``module``'s per-example gradients, or ``None``.

    The most specific registered class in ``type(module).__mro__`` wins, provided the
    module's class does not override that class's ``forward`` and the rule
    :meth:`~LayerRule.supports` the module.
    """
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base)
        if rule is None:
            continue
        if cls.forward is not base.forward:
            return None
        return rule if rule.supports(module) else None
    from ._conv1d_hf import duck_typed_rule  # layers of packages sknpeff does not import

    return duck_typed_rule(module)
