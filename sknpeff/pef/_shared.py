"""Layer outputs shared by the whole batch, broadcast into it later.

A common pattern computes a position embedding once for the batch and lets broadcasting
add it to every example: ``x = tok_emb(ids) + pos_emb(torch.arange(T))`` (or
``pos_emb(torch.arange(T))[None]``). The embedding's input then has no batch axis, and
one backward pass gives the sum of the examples' gradients, not each one's.

:class:`SharedOutputs` follows such an output (and its reshaping views, such as
``[None]`` or ``unsqueeze(0)``) through the forward pass until it meets a tensor with the
batch axis in a broadcasting elementwise operation (``+``, ``-``, ``*``). There it swaps
in one copy per example, so that the operation's result is unchanged while each example
reaches its own copy: the gradient at the copies is per example. Any other use of the
shared output (a second use included) leaves it unresolved, and its parameters go to the
generic path as before. The engine's exactness check covers the result either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["SharedOutputs"]

# same-size reshaping views and casts that keep an output's values in order
_VIEWS = frozenset({
    "__getitem__", "unsqueeze", "view", "reshape", "contiguous", "to", "float", "double",
    "half", "bfloat16", "type_as", "view_as", "reshape_as", "squeeze", "flatten",
})
# elementwise operations that broadcast their operands
_BROADCAST = frozenset({
    "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__",
    "__rmul__",
})


class _Origin:
    """One hooked module's shared output: its input, and the per-example copies once
    resolved."""

    __slots__ = ("module", "x", "out", "copies", "failed")

    def __init__(self, module, x, out):
        self.module, self.x, self.out = module, x, out
        self.copies: torch.Tensor | None = None
        self.failed = False


class SharedOutputs(TorchFunctionMode):
    """Resolves batch-shared layer outputs into per-example copies during one forward.

    Parameters
    ----------
    batch_size : int
        Size of the batch axis of the forward pass.

    Notes
    -----
    Enter it (``mode.__enter__()``) from a forward hook, on the thread of the forward
    pass, when the first shared output is seen, and leave it after the forward pass;
    :meth:`track` registers an output. Afterwards :meth:`resolved` lists
    ``(module, x, copies)``, with ``x`` and ``copies`` given a leading batch axis, and
    :meth:`unresolved` the ``(module, x, out)`` of the others.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = int(batch_size)
        self.origins: list[_Origin] = []
        self._of: dict[int, tuple[torch.Tensor, _Origin]] = {}  # id -> (tensor, origin)

    def track(self, module, x: torch.Tensor, out: torch.Tensor) -> None:
        """Follow ``out``, the output of ``module`` for input ``x``."""
        origin = _Origin(module, x, out)
        self.origins.append(origin)
        self._of[id(out)] = (out, origin)

    def _origin(self, t: Any) -> _Origin | None:
        hit = self._of.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        hits = [(i, o) for i, o in ((i, self._origin(v)) for i, v in enumerate(leaves))
                if o is not None]
        if not hits:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if len(hits) == 1 and not hits[0][1].failed and hits[0][1].copies is None:
            i, origin = hits[0]
            if name in _VIEWS and i == 0:
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor) and out.numel() == leaves[0].numel():
                    self._of[id(out)] = (out, origin)
                else:
                    origin.failed = True
                return out
            if name in _BROADCAST:
                copies = self._per_example(leaves, i)
                if copies is not None:
                    origin.copies = copies
                    leaves = list(leaves)
                    leaves[i] = copies
                    a, kw = tree_unflatten(leaves, spec)
                    return func(*a, **kw)
        out = func(*args, **kwargs)
        # queries (shape, dim, ...) return no tensor; any other use keeps the output
        # shared, so its parameters need the generic path
        if any(isinstance(v, torch.Tensor) for v in tree_flatten(out)[0]):
            for _, origin in hits:
                origin.failed = True
        return out

    def _per_example(self, leaves: list, i: int) -> torch.Tensor | None:
        """One copy of ``leaves[i]`` per example, shaped to broadcast like it against
        the other operands, or ``None`` when it is not broadcast over the batch axis."""
        t = leaves[i]
        shapes = [tuple(v.shape) for j, v in enumerate(leaves)
                  if j != i and isinstance(v, torch.Tensor)]
        if not shapes:
            return None
        try:
            full = torch.broadcast_shapes(tuple(t.shape), *shapes)
        except RuntimeError:
            return None
        padded = (1,) * (len(full) - t.dim()) + tuple(t.shape)
        if len(full) < 1 or full[0] != self.batch_size or padded[0] != 1:
            return None
        return t.reshape(padded).expand(self.batch_size, *padded[1:]).clone()

    def resolved(self) -> list[tuple]:
        """``(module, x, copies)`` of the outputs given per-example copies."""
        B = self.batch_size
        return [(o.module, o.x.unsqueeze(0).expand(B, *o.x.shape), o.copies)
                for o in self.origins if o.copies is not None and not o.failed]

    def unresolved(self) -> list[tuple]:
        """``(module, x, out)`` of the others."""
        return [(o.module, o.x, o.out) for o in self.origins
                if o.copies is None or o.failed]
