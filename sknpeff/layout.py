"""Flat parameter layout: flat index <-> (parameter name, shape, offset).

A :class:`ParameterLayout` fixes the order in which the selected parameters of a
model are concatenated into one flat vector. Every PEF column index, every
component of a decomposition and every perturbation refers to this order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ParameterLayout", "select_parameters"]


def select_parameters(model, params=None) -> list[tuple[str, Any]]:
    """Return the ``(name, parameter)`` pairs of ``model`` selected by ``params``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    params : None, sequence of str or callable, default=None
        ``None`` selects every parameter with ``requires_grad=True``; a sequence
        of names selects those parameters (in the model's order); a callable
        ``(name, parameter) -> bool`` is used as a predicate.

    Returns
    -------
    list of (str, torch.nn.Parameter)
        Selected parameters in ``model.named_parameters()`` order (shared
        parameters appear once, under their first name).
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    elif isinstance(params, str):
        raise ValueError(
            "params must be None, a list of parameter names or a predicate "
            f"(name, param) -> bool; got the string {params!r} (wrap it in a list)."
        )
    else:
        wanted = list(params)
        known = {n for n, _ in named}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(
                f"params names unknown to the model: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}; see model.named_parameters()."
            )
        if len(set(wanted)) != len(wanted):
            raise ValueError("params contains duplicate names.")
        wanted_set = set(wanted)
        chosen = [(n, p) for n, p in named if n in wanted_set]
    if not chosen:
        raise ValueError("params selects no parameter of the model.")
    return chosen


class ParameterLayout:
    """Map between a flat parameter vector and named parameter tensors.

    Parameters
    ----------
    names : sequence of str
        Parameter names, in flat order.
    shapes : sequence of tuple of int
        The shape of each parameter.

    Attributes
    ----------
    names : tuple of str
    shapes : tuple of tuple of int
    sizes : tuple of int
        Number of entries of each parameter.
    offsets : tuple of int
        Flat index of the first entry of each parameter.
    n_params : int
        Total number of entries (length of the flat vector).

    Examples
    --------
    >>> import torch
    >>> from sknpeff.layout import ParameterLayout
    >>> layout = ParameterLayout.from_model(torch.nn.Linear(3, 2))
    >>> layout.names, layout.n_params
    (('weight', 'bias'), 8)
    >>> layout.locate(7)
    ('bias', (1,))
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        names = tuple(str(n) for n in names)
        shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
        if len(names) != len(shapes):
            raise ValueError("names and shapes must have the same length.")
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique.")
        self.names = names
        self.shapes = shapes
        self.sizes = tuple(math.prod(s) for s in shapes)
        offsets = [0]
        for size in self.sizes:
            offsets.append(offsets[-1] + size)
        self.offsets = tuple(offsets[:-1])
        self.n_params = offsets[-1]
        self._index = {n: i for i, n in enumerate(names)}
        self._ends = np.asarray(offsets[1:], dtype=np.int64)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls, model, params: None | Iterable[str] | Callable[[str, Any], bool] = None
    ) -> ParameterLayout:
        """Layout of the parameters of ``model`` selected by ``params``.

        Parameters
        ----------
        model : torch.nn.Module
        params : None, list of str or callable, default=None
            See :func:`select_parameters`.
        """
        chosen = select_parameters(model, params)
        return cls([n for n, _ in chosen], [tuple(p.shape) for _, p in chosen])

    def to_dict(self) -> dict:
        """JSON-serialisable description (``from_dict`` inverts it)."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ParameterLayout:
        """Inverse of :meth:`to_dict`."""
        return cls(d["names"], d["shapes"])

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self._index

    def __eq__(self, other) -> bool:
        if not isinstance(other, ParameterLayout):
            return NotImplemented
        return self.names == other.names and self.shapes == other.shapes

    def __hash__(self) -> int:
        return hash((self.names, self.shapes))

    def __repr__(self) -> str:
        return f"ParameterLayout(n_tensors={len(self.names)}, n_params={self.n_params})"

    def __getstate__(self):
        return self.to_dict()

    def __setstate__(self, state):
        self.__init__(state["names"], state["shapes"])

    def slice(self, name: str) -> slice:
        """Flat slice of parameter ``name``."""
        i = self._index[name]
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def locate(self, flat_index: int) -> tuple[str, tuple[int, ...]]:
        """Return ``(name, local_index)`` of a flat index.

        ``local_index`` is a tuple indexing the parameter tensor. Indices of
        low-rank PEF columns (``slot * n_params + j``) should be reduced modulo
        ``n_params`` first.
        """
        flat_index = int(flat_index)
        if flat_index < 0:
            flat_index += self.n_params
        if not 0 <= flat_index < self.n_params:
            raise IndexError(f"flat index out of range for {self.n_params} parameters.")
        i = int(np.searchsorted(self._ends, flat_index, side="right"))
        local = flat_index - self.offsets[i]
        shape = self.shapes[i]
        idx = tuple(int(v) for v in np.unravel_index(local, shape)) if shape else ()
        return self.names[i], idx

    def locate_many(self, flat_indices) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :meth:`locate`: tensor positions and local flat offsets.

        Returns
        -------
        tensor_ids : ndarray of int64
            Position in :attr:`names` of each index.
        local : ndarray of int64
            Flat offset inside that parameter tensor.
        """
        flat = np.asarray(flat_indices, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_params):
            raise IndexError(f"flat index out of range for {self.n_params} parameters.")
        ids = np.searchsorted(self._ends, flat, side="right")
        return ids, flat - np.asarray(self.offsets, dtype=np.int64)[ids]

    def split(self, flat_vector) -> dict:
        """Split a flat vector (NumPy array or torch tensor) into named tensors.

        The results are reshaped views when possible.
        """
        if flat_vector.shape[-1] != self.n_params or flat_vector.ndim != 1:
            raise ValueError(
                f"expected a flat vector of length {self.n_params}, got shape "
                f"{tuple(flat_vector.shape)}."
            )
        return {
            n: flat_vector[o : o + s].reshape(shape)
            for n, shape, o, s in zip(
                self.names, self.shapes, self.offsets, self.sizes, strict=True
            )
        }

    def flatten(self, tensors: Mapping) -> Any:
        """Concatenate named tensors (NumPy or torch) into one flat vector."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"missing parameters: {missing[:5]}")
        parts = []
        for n, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[n]
            if tuple(t.shape) != shape:
                raise ValueError(f"{n}: expected shape {shape}, got {tuple(t.shape)}.")
            parts.append(t.reshape(-1))
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        import torch

        return torch.cat(parts)

    def from_model_tensors(self, model) -> Any:
        """Flat vector of ``model``'s current values of these parameters (torch)."""
        named = dict(model.named_parameters(remove_duplicate=False))
        return self.flatten({n: named[n].detach() for n in self.names})
