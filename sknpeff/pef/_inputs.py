"""Examples in, batches out: the inputs a PEF computation accepts.

Batches of any shape a model eats (tensors, arrays, dicts of them, tuples of them read
as columns, lists of per-example items or of strings, torch Datasets and DataLoaders),
moved to the model's device, the forward adapters that turn a model's output into a
``(batch, n_outputs)`` logits tensor, and the checks of what comes out (logits of the
right shape, not probabilities, finite).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import user_stacklevel

__all__ = [
    "ForwardWrapper",
    "as_logits",
    "batch_length",
    "as_tensor",
    "check_finite",
    "check_logits",
    "check_not_probabilities",
    "default_forward",
    "example_rows",
    "first_batch",
    "holds_text",
    "iter_batches",
    "known_n_examples",
    "n_examples",
    "pad_token_ids",
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


def _is_loader(X) -> bool:
    return isinstance(X, torch.utils.data.DataLoader)


def _is_columns(X) -> bool:
    """Whether ``X`` is a tuple of arrays batched along one first axis (``(inputs,
    targets)``, as given to ``TensorDataset``): its batches are tuples of slices."""
    if not isinstance(X, tuple) or not X:
        return False
    if not all(isinstance(c, (torch.Tensor, np.ndarray)) and c.ndim >= 1 for c in X):
        return False
    return len({int(c.shape[0]) for c in X}) == 1


def _is_text(v) -> bool:
    return isinstance(v, (str, bytes))


def _is_number(v) -> bool:
    return isinstance(v, (numbers.Number, np.bool_))


def _numeric_rows(items: Sequence) -> bool:
    """Whether ``items`` are (nested) lists or tuples of numbers only: rows of an array."""

    def numeric(seq) -> bool:
        return all(_is_number(e) or (isinstance(e, (list, tuple)) and numeric(e)) for e in seq)

    return all(isinstance(it, (list, tuple)) and numeric(it) for it in items)


def _is_int_seq(v) -> bool:
    """Whether ``v`` is one example's token ids: a list, tuple or 1-D array of ints."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 1 and not (v.is_floating_point() or v.is_complex())
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.dtype.kind in "iu"
    return (isinstance(v, (list, tuple)) and len(v) > 0
            and all(isinstance(e, (numbers.Integral, np.integer))
                    and not isinstance(e, bool) for e in v))


def _ragged_ids(items) -> bool:
    """Whether ``items`` are token-id sequences of at least two different lengths."""
    return (isinstance(items, (list, tuple)) and len(items) > 0
            and all(_is_int_seq(v) for v in items) and len({len(v) for v in items}) > 1)


def _is_id_columns(X) -> bool:
    """A dict of per-example lists of token ids such as a tokenizer's unpadded output
    (``{"input_ids": [[...], [...]], "attention_mask": [[...], [...]]}``)."""
    return (isinstance(X, Mapping) and len(X) > 0
            and all(isinstance(v, (list, tuple)) and v and all(_is_int_seq(e) for e in v)
                    for v in X.values())
            and len({len(v) for v in X.values()}) == 1)


def pad_token_ids(seqs, pad_id: int = 0, *, key: str = "input_ids") -> dict:
    """Pad token-id sequences of different lengths on the right into a batch.

    Parameters
    ----------
    seqs : sequence of sequences of int, or dict of them
        One sequence of token ids per example, or a dict of such per-example lists (a
        tokenizer's unpadded output: ``input_ids``, ``attention_mask``,
        ``token_type_ids``, ...), each padded alike.
    pad_id : int, default=0
        Id written at the padded positions of ``key`` (other columns are padded with
        0). The padded positions get ``attention_mask`` 0.
    key : str, default="input_ids"
        Name of the sequences when ``seqs`` is not a dict.

    Returns
    -------
    batch : dict of torch.Tensor
        ``key`` (and the dict's other columns) as ``(B, T)`` int64 tensors and an
        ``attention_mask`` of ones at the real tokens.

    Examples
    --------
    >>> from sknpeff.pef import pad_token_ids
    >>> b = pad_token_ids([[5, 6, 7], [8]])
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    cols = dict(seqs) if isinstance(seqs, Mapping) else {key: seqs}
    ref = key if key in cols else next(iter(cols))
    lens = [len(v) for v in cols[ref]]
    T = max(lens) if lens else 0
    out = {}
    for name, col in cols.items():
        fill = pad_id if name == key else 0
        t = torch.full((len(col), T), fill, dtype=torch.long)
        for i, v in enumerate(col):
            if len(v) != lens[i]:
                raise ValueError(
                    f"example {i} has {len(v)} entries in {name!r} but {lens[i]} in "
                    f"{ref!r}.")
            t[i, : len(v)] = torch.as_tensor(np.asarray(v, dtype=np.int64))
        out[name] = t
    if "attention_mask" not in out:
        mask = torch.zeros(len(lens), T, dtype=torch.long)
        for i, n in enumerate(lens):
            mask[i, :n] = 1
        out["attention_mask"] = mask
    return out


def _loader_n_examples(loader) -> int | None:
    """Examples a DataLoader yields per pass, when its sampler or dataset tells."""
    iterable = isinstance(loader.dataset, torch.utils.data.IterableDataset)
    try:
        n = len(loader.sampler if loader.batch_size is not None and not iterable
                else loader.dataset)
    except TypeError:  # an IterableDataset without __len__
        return None
    if loader.batch_size is None:
        # a custom batch_sampler (assumed to cover the dataset), or no automatic
        # batching: each item of the dataset is a batch whose size is unknown
        return n if loader.batch_sampler is not None else None
    if loader.drop_last:
        n -= n % loader.batch_size
    return n


def n_examples(X) -> int | None:
    """Number of examples in ``X`` (``None`` when unknown: a Dataset without ``len``, a
    DataLoader whose sampler and dataset do not tell)."""
    if isinstance(X, (torch.Tensor, np.ndarray)):
        if X.ndim == 0:
            raise ValueError("X must be batched along its first axis; got a 0-d array.")
        return int(X.shape[0])
    if _is_id_columns(X):
        return len(next(iter(X.values())))
    if isinstance(X, Mapping):
        lens = {int(v.shape[0]) for v in X.values() if hasattr(v, "shape") and len(v.shape)}
        if len(lens) != 1:
            raise ValueError(
                "a dict X must hold arrays batched along the first axis, all of the same "
                f"length; got lengths {sorted(lens)}."
            )
        return lens.pop()
    if _is_columns(X):
        return int(X[0].shape[0])
    if _is_loader(X):
        return _loader_n_examples(X)
    if _is_dataset(X):
        try:
            return len(X)
        except TypeError:
            return None
    if isinstance(X, (list, tuple)):
        return len(X)
    raise ValueError(
        "X must be a tensor/array batched along the first axis, a dict of such arrays, a "
        "tuple of such arrays (columns such as (inputs, targets)), a list of per-example "
        "items (e.g. dicts of tensors, or strings for a tokenizing forward), a torch "
        f"Dataset or a torch DataLoader; got {type(X).__name__}."
    )


def as_tensor(v):
    """A NumPy array as a tensor (sharing memory); anything else unchanged."""
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def _shapes(item, path: str = "") -> dict[str, tuple]:
    """``{path: shape}`` of the leaves of one example; a list of numbers is one leaf."""
    if isinstance(item, Mapping):
        out: dict[str, tuple] = {}
        for k, v in item.items():
            out.update(_shapes(v, f"{path}[{k!r}]"))
        return out
    if isinstance(item, (list, tuple)):
        out = {path: (len(item),)}
        if not all(_is_number(e) for e in item):
            for i, v in enumerate(item):
                out.update(_shapes(v, f"{path}[{i}]"))
        return out
    if hasattr(item, "shape"):
        return {path: tuple(item.shape)}
    return {}


def _ragged_error(items: Sequence, start: int | None) -> ValueError | None:
    """The error for examples whose shapes differ (``None`` when they do not)."""
    shapes = [_shapes(it) for it in items]
    for path, first in shapes[0].items():
        seen: dict[tuple, int] = {first: 0}
        for i, sh in enumerate(shapes[1:], 1):
            if path in sh:
                seen.setdefault(sh[path], i)
        if len(seen) < 2:
            continue
        where = f"example{path} has shapes" if path else "their shapes are"
        at = "; ".join(
            f"{sh} (example {i} of a batch)" if start is None else f"{sh} (example {start + i})"
            for sh, i in list(seen.items())[:4])
        return ValueError(
            f"the examples have different lengths and cannot be stacked into a batch: "
            f"{where} {at}. Pad them: pass a torch.utils.data.DataLoader whose "
            "collate_fn pads each batch (e.g. DataLoader(X, batch_size=32, "
            "collate_fn=transformers.DataCollatorWithPadding(tokenizer))), or pass the "
            "padded batch (e.g. tokenizer(texts, padding=True, return_tensors='pt')). "
            "Token ids of a sequence model are padded for you with position=... (see "
            "PEFTransformer), or by sknpeff.pef.pad_token_ids."
        )
    return None


def _collate(items: Sequence, start: int | None = None):
    """``default_collate`` of per-example items (``start``: index of the first one in
    ``X``, for error messages); a clear error for items of different lengths."""
    items = [tree_map(as_tensor, it) for it in items]
    try:
        return torch.utils.data.default_collate(items)
    except (RuntimeError, TypeError, ValueError) as exc:
        err = _ragged_error(items, start)
        if err is None:
            raise
        raise err from exc


def _as_rows(items: list) -> np.ndarray:
    """Equal-length lists of numbers as the rows of an array (a clear error otherwise)."""
    try:
        return np.asarray(items)
    except ValueError as exc:
        err = _ragged_error(items, 0)
        if err is None:
            raise
        raise err from exc


def _warn_if_shuffled(loader) -> None:
    if isinstance(loader.sampler, torch.utils.data.RandomSampler):
        warnings.warn(
            "the DataLoader shuffles its examples (shuffle=True): results come in the "
            "order of its batches, a new one at every pass, and cannot be matched to the "
            "dataset's examples. Pass a DataLoader with shuffle=False.",
            stacklevel=user_stacklevel(),
        )


def iter_batches(X, batch_size: int, *, pad_ids: bool = False) -> Iterator[Any]:
    """Consecutive batches of at most ``batch_size`` examples of ``X``, in order.

    ``pad_ids``: token-id sequences of different lengths (a list of them, or a dict of
    such per-example lists: a tokenizer's unpadded output) are padded per batch by
    :func:`pad_token_ids` (otherwise they raise the error of ragged examples).

    A DataLoader's batches come as it makes them (its own batch size and
    ``collate_fn``); ``batch_size`` is not used then. A tuple of arrays with one first
    dimension gives tuples of slices; a list of strings (or an array of them), lists of
    strings; a list of equal-length lists of numbers, slices of their array.
    """
    if _is_loader(X):
        _warn_if_shuffled(X)
        yield from X
    elif isinstance(X, np.ndarray) and X.dtype.kind in "US":
        for s in range(0, X.shape[0], batch_size):
            yield X[s : s + batch_size].tolist()
    elif isinstance(X, (torch.Tensor, np.ndarray)):
        for s in range(0, X.shape[0], batch_size):
            yield as_tensor(X[s : s + batch_size])
    elif pad_ids and _is_id_columns(X):
        n = n_examples(X)
        for s in range(0, n, batch_size):
            yield pad_token_ids({k: list(v[s : s + batch_size]) for k, v in X.items()})
    elif isinstance(X, Mapping):
        ragged = [v for v in X.values() if _is_id_columns(X) and _ragged_ids(v)]
        if ragged:
            raise _ragged_error(list(ragged[0]), 0)
        n = n_examples(X)
        for s in range(0, n, batch_size):
            yield {
                k: (as_tensor(v[s : s + batch_size]) if hasattr(v, "shape") and len(v.shape)
                    else v)
                for k, v in X.items()
            }
    elif _is_columns(X):
        for s in range(0, X[0].shape[0], batch_size):
            yield tuple(as_tensor(c[s : s + batch_size]) for c in X)
    elif _is_dataset(X):
        loader = torch.utils.data.DataLoader(
            X, batch_size=batch_size, shuffle=False, collate_fn=_collate
        )
        yield from loader
    else:
        X = list(X)
        if X and _is_text(X[0]):
            if not all(_is_text(v) for v in X):
                raise ValueError("a list X of strings must hold strings only.")
            for s in range(0, len(X), batch_size):
                yield X[s : s + batch_size]
            return
        if pad_ids and _ragged_ids(X):
            # token ids of different lengths: padded per batch, with an attention mask
            for s in range(0, len(X), batch_size):
                yield pad_token_ids(X[s : s + batch_size])
            return
        if X and isinstance(X[0], (list, tuple)) and _numeric_rows(X):
            yield from iter_batches(_as_rows(X), batch_size)
            return
        if X and not isinstance(X[0], (Mapping, torch.Tensor, np.ndarray, tuple, list)):
            arr = np.asarray(X)
            yield from iter_batches(arr, batch_size)
            return
        for s in range(0, len(X), batch_size):
            yield _collate(X[s : s + batch_size], s)


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
    """``model(batch)``; ``model(**batch)`` for dicts; ``model(batch[0])`` for pairs and
    other tuples or lists, but ``model(batch)`` for a list of strings."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list) and batch and _is_text(batch[0]):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        # (inputs, targets) pairs as returned by most labelled Datasets.
        return model(batch[0])
    return model(batch)


def holds_text(batch) -> bool:
    """Whether ``batch`` holds a list of strings (per-example data that ``torch.func.vmap``
    cannot split: it reaches every example whole)."""
    if isinstance(batch, list) and batch and _is_text(batch[0]):
        return True
    if isinstance(batch, Mapping):
        return any(holds_text(v) for v in batch.values())
    return isinstance(batch, (tuple, list)) and any(holds_text(v) for v in batch)


def example_rows(batch, b0: int, b1: int):
    """Examples ``b0:b1`` of ``batch``: tensors sliced along their first axis, lists of
    strings sliced, other leaves as they are."""
    if isinstance(batch, list) and batch and _is_text(batch[0]):
        return batch[b0:b1]
    if isinstance(batch, Mapping):
        return {k: example_rows(v, b0, b1) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(example_rows(v, b0, b1) for v in batch)
    if isinstance(batch, list):
        return [example_rows(v, b0, b1) for v in batch]
    if isinstance(batch, torch.Tensor):
        return batch[b0:b1]
    return batch


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


# -- checks of the model's output ----------------------------------------------------------------


def check_logits(logits: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless ``logits`` has shape ``(batch, n_classes)``.

    The message says how to get there from a sequence model's per-position logits
    ``(batch, seq_len, vocab)`` and from one logit per example of shape ``(batch,)``.

    Parameters
    ----------
    logits : torch.Tensor
        What the model (or ``forward``) returned, through :func:`as_logits`.
    """
    if logits.dim() == 2:
        return
    if logits.dim() == 3:
        hint = (
            " Per-position logits (batch, seq_len, vocab) of a sequence model: say which "
            "position is explained with PEFTransformer(..., position=...): 'last' (the "
            "last position), 'last_nonpad' (each example's last non-padding token, from "
            "the batch's attention_mask), an int index, or one position per example (an "
            "array, or the name of a column of dict batches)."
        )
    elif logits.dim() == 1:
        hint = (
            " One logit per example (a binary classifier): return it as shape (batch, 1), "
            "e.g. forward=lambda m, b: m(b)[:, None]; one logit is read as a sigmoid "
            "output (see PEFTransformer's output parameter)."
        )
    else:
        hint = " Select or reshape them in forward=lambda m, b: ..."
    raise ValueError(
        "the model (or forward) must return logits of shape (batch, n_classes); got "
        f"shape {tuple(logits.shape)}.{hint}"
    )


def check_not_probabilities(logits: torch.Tensor) -> None:
    """Warn when ``logits`` look like probabilities (softmax already applied).

    Every row non-negative and summing to 1 within ``1e-4``: the PEFs would be those of
    the softmax of the probabilities. Log-probabilities are fine (``softmax(log p) = p``).

    Parameters
    ----------
    logits : torch.Tensor of shape (batch, n_outputs)
        The model's output on a first batch.
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        return
    lg = logits.detach().to(torch.float64)
    if bool((lg >= 0).all()) and bool(((lg.sum(1) - 1).abs() <= 1e-4).all()):
        warnings.warn(
            "the model's outputs look like probabilities (every row is non-negative and "
            "sums to 1), not logits: the PEFs apply a softmax to them, so they would be "
            "wrong. Return the logits (drop the final softmax), or log-probabilities "
            "(log_softmax is fine: softmax(log p) = p), e.g. forward=lambda m, b: "
            "m(b).clamp_min(1e-30).log().",
            stacklevel=user_stacklevel(),
        )


def _nonfinite(v, n: int | None) -> np.ndarray | None:
    """Whether a floating-point leaf holds NaN or infinity: per row of its first axis
    (``n`` rows), or as a whole (``n=None``); ``None`` for other leaves."""
    if isinstance(v, np.ndarray) and v.dtype.kind in "fc":
        bad = ~np.isfinite(v)
    elif isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
        bad = (~torch.isfinite(v)).cpu().numpy()
    elif isinstance(v, float):
        bad = np.asarray(not np.isfinite(v))
    else:
        return None
    if n is None:
        return np.asarray(bad.any())
    if bad.ndim == 0 or bad.shape[0] != n:
        return None
    return bad.reshape(n, -1).any(axis=1)


def _nonfinite_inputs(X, idx: np.ndarray) -> np.ndarray | None:
    """Per example ``idx`` of ``X``: whether its floating-point inputs hold NaN or
    infinity (``None`` when ``X`` cannot be indexed: a DataLoader, an iterable Dataset)."""
    if _is_loader(X) or isinstance(X, torch.utils.data.IterableDataset):
        return None
    rows = take_rows(X, idx)
    if isinstance(X, (torch.Tensor, np.ndarray, Mapping)) or _is_columns(X):
        # batched along the first axis
        out = np.zeros(len(idx), dtype=bool)
        for v in tree_leaves(rows):
            bad = _nonfinite(v, len(idx))
            if bad is not None:
                out |= bad
        return out
    # per-example items (a list, a Dataset's Subset)
    items = [rows[j] for j in range(len(idx))]
    return np.array([any(bool(b) for b in (_nonfinite(v, None) for v in tree_leaves(it))
                         if b is not None) for it in items], dtype=bool)


def _few(idx, k: int = 8) -> str:
    idx = [int(i) for i in idx]
    return ", ".join(map(str, idx[:k])) + (", ..." if len(idx) > k else "")


def check_finite(X, start: int, logits: np.ndarray, norms: np.ndarray) -> None:
    """Raise a ``ValueError`` naming the examples of a batch whose logits or PEF norms
    are not finite, and whether their floating-point inputs hold NaN or infinity.

    ``-inf`` logits (classes masked out) are fine while a row keeps a finite one.

    Parameters
    ----------
    X : object
        The examples, as given to ``compute``.
    start : int
        Index in ``X`` of the batch's first example.
    logits : ndarray of shape (B, n_outputs)
        The batch's logits.
    norms : ndarray of shape (B,)
        The batch's PEF norms.
    """
    bad_logits = (np.isnan(logits).any(axis=1) | np.isposinf(logits).any(axis=1)
                  | ~np.isfinite(logits).any(axis=1))
    bad = bad_logits | ~np.isfinite(norms)
    if not bad.any():
        return
    idx = start + np.flatnonzero(bad)
    parts = []
    if bad_logits.any():
        parts.append(f"the logits of example(s) {_few(start + np.flatnonzero(bad_logits))}")
    if not bad_logits[bad].all():
        only = start + np.flatnonzero(bad & ~bad_logits)
        parts.append(f"the PEF norms of example(s) {_few(only)} (whose logits are finite)")
    msg = (f"{idx.size} example(s) of the batch of examples {start} to {start + bad.size - 1} "
           f"give NaN or infinity: {'; '.join(parts)}.")
    flags = _nonfinite_inputs(X, idx)
    if flags is None:
        msg += (f" Their inputs could not be checked here (X is a {type(X).__name__}): "
                "check them for NaN or infinity.")
    elif flags.any():
        msg += (f" The floating-point inputs of examples {_few(idx[flags])} hold NaN or "
                "infinity: fix or drop those examples (e.g. torch.nan_to_num, or keep the "
                "rows where torch.isfinite(x) holds everywhere).")
    if flags is not None and not flags.all():
        msg += (f" The inputs of examples {_few(idx[~flags])} are finite: the model "
                "makes the NaN or infinity (check its parameters with "
                "torch.isfinite, and for overflow in float16/bfloat16).")
    raise ValueError(msg)


# ---------------------------------------------------------------------------------------------


def first_batch(X, batch_size: int, *, pad_ids: bool = False):
    """A first batch of at most ``min(batch_size, 2)`` examples of ``X`` (to probe the
    model); a DataLoader's first batch as it comes. ``pad_ids`` as in
    :func:`iter_batches`.
    """
    n = n_examples(X)
    if n == 0:
        raise ValueError("X holds no example.")
    it = iter(X) if _is_loader(X) else iter_batches(X, min(batch_size, 2), pad_ids=pad_ids)
    for batch in it:
        return batch
    raise ValueError("X holds no example.")


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
    if _is_id_columns(X):
        return {k: [v[int(i)] for i in idx] for k, v in X.items()}
    if isinstance(X, Mapping):
        return {k: (take_rows(v, idx) if hasattr(v, "shape") and len(v.shape) else v)
                for k, v in X.items()}
    if _is_columns(X):
        return tuple(take_rows(c, idx) for c in X)
    if _is_loader(X):
        raise ValueError(
            "picking examples by index (as GuidedPerturber does) needs indexable examples "
            "(a tensor, an array, a dict or tuple of them, a list or a Dataset), not a "
            "DataLoader: pass its dataset (loader.dataset, whose items are then collated "
            "with torch's default_collate) or the examples themselves."
        )
    if _is_dataset(X):
        return torch.utils.data.Subset(X, idx.tolist())
    return [X[int(i)] for i in idx]


def batch_length(batch, why: str) -> int:
    """Number of examples of a batch: the first axis of its first array (tensor or
    NumPy), or its length (a list of strings or of token lists).

    ``why`` says what needs the number, for the error raised when it is unknown.
    """
    for v in tree_leaves(batch):
        if hasattr(v, "shape") and len(v.shape):
            return int(v.shape[0])
    if isinstance(batch, list):
        return len(batch)
    raise ValueError(
        f"{why}, but the number of examples of a {type(batch).__name__} batch is "
        "unknown: give batches of arrays or lists.")
