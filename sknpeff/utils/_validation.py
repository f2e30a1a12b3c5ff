"""Validation of scalar parameters, with messages that name the parameter."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "InvalidParameterError",
    "check_choice",
    "check_eval_mode",
    "check_float",
    "check_int",
]


class InvalidParameterError(ValueError, TypeError):
    """A parameter has the wrong type or value.

    Inherits from both ``ValueError`` and ``TypeError``, as scikit-learn's own
    ``InvalidParameterError`` does, so callers may catch either.
    """


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> int | None:
    """Return ``value`` as an ``int`` after checking it is an integer in ``[low, high]``.

    Parameters
    ----------
    value : object
        The value passed by the user. ``bool`` is refused (``True`` is not a count).
    name : str
        The parameter's name, used in the error message.
    low, high : int, default=None
        Inclusive bounds; ``None``: unbounded on that side.
    allow_none : bool, default=False
        Accept ``None`` (and return it).

    Returns
    -------
    value : int or None

    Raises
    ------
    InvalidParameterError
        Naming the parameter, what was expected and what was given.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        ok = (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise InvalidParameterError(
            f"{name} must be {'None or ' if allow_none else ''}an integer"
            f"{_bounds(low, high, False)}; got {value!r}."
        )
    return int(value)


def check_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                strict: bool = False, allow_none: bool = False) -> float | None:
    """Return ``value`` as a ``float`` after checking it is a finite number in range.

    Parameters
    ----------
    value : object
        The value passed by the user (any real number but ``bool``, NaN or infinity).
    name : str
        The parameter's name, used in the error message.
    low, high : float, default=None
        Bounds; ``None``: unbounded on that side.
    strict : bool, default=False
        Exclude the bounds themselves.
    allow_none : bool, default=False
        Accept ``None`` (and return it).

    Returns
    -------
    value : float or None

    Raises
    ------
    InvalidParameterError
        Naming the parameter, what was expected and what was given.
    """
    if value is None and allow_none:
        return None
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))
    if ok:
        if strict:
            ok = (low is None or value > low) and (high is None or value < high)
        else:
            ok = (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise InvalidParameterError(
            f"{name} must be {'None or ' if allow_none else ''}a finite number"
            f"{_bounds(low, high, strict)}; got {value!r}."
        )
    return float(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` after checking it is one of ``choices``.

    Raises
    ------
    InvalidParameterError
        Naming the parameter and listing the choices.
    """
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable or incomparable
        ok = False
    if ok and isinstance(value, bool):  # True == 1: a flag is not a number
        ok = any(c is value for c in choices)
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise InvalidParameterError(f"{name} must be one of {listed}; got {value!r}.")
    return value


def _bounds(low, high, strict: bool) -> str:
    lo, hi = (">", "<") if strict else (">=", "<=")
    if low is not None and high is not None:
        return f" {lo} {low} and {hi} {high}"
    if low is not None:
        return f" {lo} {low}"
    if high is not None:
        return f" {hi} {high}"
    return ""


def check_eval_mode(model, consequence: str, *, allow_train_mode: bool = False,
                    allow_param: str | None = None) -> None:
    """Refuse a torch model in training mode.

    Batch norm in training mode (or without running statistics) couples the examples of
    a batch and is always refused; other modules in training mode (dropout) make every
    result random and are refused unless ``allow_train_mode``.

    Parameters
    ----------
    model : torch.nn.Module
    consequence : str
        What training mode would do, for the message (e.g. ``"makes PEFs random"``).
    allow_train_mode : bool, default=False
        Accept dropout and other training-mode modules (batch norm never).
    allow_param : str, default=None
        The caller's parameter that sets ``allow_train_mode``, named in the message.

    Raises
    ------
    ValueError
        Naming the modules in training mode and saying to call ``model.eval()``.
    """
    from torch import nn

    bn_train = [n for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and (m.training or m.running_mean is None)]
    if bn_train:
        raise ValueError(
            "batch norm layers in training mode (or without running statistics) couple "
            f"the examples of a batch, so per-example Fishers are undefined: {bn_train[:3]}."
            " Call model.eval() first."
        )
    training = [n or type(m).__name__ for n, m in model.named_modules() if m.training]
    if training and not allow_train_mode:
        raise ValueError(
            f"the model is in training mode (dropout, batch-norm statistics), which "
            f"{consequence} (modules in training mode: {training[:3]}). Call model.eval()"
            + (f", or pass {allow_param}=True to proceed anyway." if allow_param else ".")
        )
