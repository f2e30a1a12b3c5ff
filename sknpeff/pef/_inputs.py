"""Examples in, batches out: the inputs a PEF computation accepts.

Batches of any shape a model eats (tensors, arrays, dicts of them, lists of per-example
items, torch Datasets), moved to the model's device, and the forward adapters that turn
a model's output into a ``(batch, n_outputs)`` logits tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ForwardWrapper",
    "as_logits",
    "as_tensor",
    "default_forward",
    "first_batch",
    "iter_batches",
    "known_n_examples",
    "n_examples",
    "take_rows",
    "to_device",
    "tree_leaves",
    "tree_map",
]


def tree_map(fn, tree):
    """``fn`` applied to every leaf of nested dicts, tuples and lists (structure kept)."""
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(tree_map(fn, v) for v in tree)
    if isinstance(tree, list):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def tree_leaves(tree) -> list:
    """The leaves of nested dicts, tuples and lists, in order."""
    out: list = []
    tree_map(lambda v: out.append(v), tree)
    return out


def _is_dataset(X) -> bool:
    return isinstance(X, torch.utils.data.Dataset)


def n_examples(X) -> int | None:
    """Number of examples in ``X`` (``None`` for a Dataset without ``len``)."""
    if isinstance(X, (torch.Tensor, np.ndarray)):
        if X.ndim == 0:
            raise ValueError("X must be batched along its first axis; got a 0-d array.")
        return int(X.shape[0])
    if isinstance(X, Mapping):
        lens = {int(v.shape[0]) for v in X.values() if hasattr(v, "shape") and len(v.shape)}
        if len(lens) != 1:
            raise ValueError(
                "a dict X must hold arrays batched along the first axis, all of the same "
                f"length; got lengths {sorted(lens)}."
            )
        return lens.pop()
    if _is_dataset(X):
        try:
            return len(X)
        except TypeError:
            return None
    if isinstance(X, (list, tuple)):
        return len(X)
    raise ValueError(
        "X must be a tensor/array batched along the first axis, a dict of such arrays, "
        f"a list of per-example items (e.g. dicts of tensors), or a torch Dataset; got "
        f"{type(X).__name__}."
    )


def as_tensor(v):
    """A NumPy array as a tensor (sharing memory); anything else unchanged."""
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def _collate(items: Sequence):
    return torch.utils.data.default_collate([tree_map(as_tensor, it) for it in items])


def iter_batches(X, batch_size: int) -> Iterator[Any]:
    """Consecutive batches of at most ``batch_size`` examples of ``X``, in order."""
    if isinstance(X, (torch.Tensor, np.ndarray)):
        for s in range(0, X.shape[0], batch_size):
            yield as_tensor(X[s : s + batch_size])
    elif isinstance(X, Mapping):
        n = n_examples(X)
        for s in range(0, n, batch_size):
            yield {
                k: (as_tensor(v[s : s + batch_size]) if hasattr(v, "shape") and len(v.shape)
                    else v)
                for k, v in X.items()
            }
    elif _is_dataset(X):
        loader = torch.utils.data.DataLoader(
            X, batch_size=batch_size, shuffle=False, collate_fn=_collate
        )
        yield from loader
    else:
        X = list(X)
        if X and not isinstance(X[0], (Mapping, torch.Tensor, np.ndarray, tuple, list)):
            arr = np.asarray(X)
            yield from iter_batches(arr, batch_size)
            return
        for s in range(0, len(X), batch_size):
            yield _collate(X[s : s + batch_size])


def to_device(batch, device, float_dtype):
    """Tensors of ``batch`` on ``device``; floating ones cast to the model's dtype."""

    def conv(v):
        v = as_tensor(v)
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.dtype != float_dtype:
                v = v.to(float_dtype)
            return v.to(device, non_blocking=True)
        return v

    return tree_map(conv, batch)


def default_forward(model, batch):
    """``model(batch)``; ``model(**batch)`` for dicts; ``model(batch[0])`` for pairs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        # (inputs, targets) pairs as returned by most labelled Datasets.
        return model(batch[0])
    return model(batch)


def as_logits(out) -> torch.Tensor:
    """The logits tensor of a model's output (a tensor, ``.logits``, ``["logits"]``, ``[0]``)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        "the model (or forward) must return a logits tensor of shape (batch, n_classes) "
        f"(or an object with a .logits attribute); got {type(out).__name__}."
    )


class ForwardWrapper(nn.Module):
    """Module whose forward is ``forward(model, batch)``; lets torch.func reparametrize."""

    def __init__(self, model, forward):
        super().__init__()
        self.model = model
        self._fwd = forward

    def forward(self, batch):
        return as_logits(self._fwd(self.model, batch))


# ---------------------------------------------------------------------------------------------


def first_batch(X, batch_size: int):
    """A first batch of at most ``min(batch_size, 2)`` examples of ``X`` (to probe the model)."""
    n = n_examples(X)
    if n == 0:
        raise ValueError("X holds no example.")
    return next(iter(iter_batches(X, min(batch_size, 2))))


def known_n_examples(X) -> int:
    """Number of examples in ``X``, which must be known (not a Dataset without ``len``)."""
    n = n_examples(X)
    if n is None:
        raise ValueError("X must have a known length (a Dataset without __len__ cannot be "
                         "ranked into top examples).")
    return n


def take_rows(X, idx) -> Any:
    """Examples ``idx`` of ``X``, in the same input form (a Dataset gives a ``Subset``)."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(X, torch.Tensor):
        return X[torch.from_numpy(idx).to(X.device)]
    if isinstance(X, np.ndarray):
        return X[idx]
    if isinstance(X, Mapping):
        return {k: (take_rows(v, idx) if hasattr(v, "shape") and len(v.shape) else v)
                for k, v in X.items()}
    if _is_dataset(X):
        return torch.utils.data.Subset(X, idx.tolist())
    return [X[int(i)] for i in idx]
