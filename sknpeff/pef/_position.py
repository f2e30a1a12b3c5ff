"""Which token of a sequence model's output is explained: the ``position`` option.

A language model returns logits per position, ``(batch, seq_len, vocab)``; a PEF is the
Fisher of one distribution, so one position per example is picked: the last one, a
fixed index, each example's last non-padding token (from its attention mask), or a
position given per example (a column of the batch, or an array aligned with ``X``).

The pick is a gather inside the forward pass, written with tensor ops only, so the
per-layer rules and ``torch.func.vmap`` see an ordinary batched computation whatever the
padding (no per-example Python branching).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..utils import InvalidParameterError
from ._inputs import as_logits, batch_length, default_forward

__all__ = [
    "BATCH_KEY",
    "POSITION_KEY",
    "PositionForward",
    "attach_positions",
    "check_position",
    "last_nonpad_positions",
    "select_position",
]

#: keys of the dict that carries a batch with its per-example positions (position array)
BATCH_KEY = "__sknpeff_batch__"
POSITION_KEY = "__sknpeff_position__"

_KEYWORDS = ("last", "last_nonpad")


def check_position(position: Any) -> Any:
    """Validate ``position``; return it (a 1-D int64 array for array-likes).

    Parameters
    ----------
    position : None, "last", "last_nonpad", int, str or array-like of int
        See :class:`~sknpeff.PEFTransformer`.

    Returns
    -------
    position : None, str, int or ndarray of int64
    """
    if position is None or isinstance(position, str):
        return position
    if isinstance(position, numbers.Integral) and not isinstance(position, bool):
        return int(position)
    if isinstance(position, (list, tuple, np.ndarray, torch.Tensor)):
        arr = (position.detach().cpu().numpy() if isinstance(position, torch.Tensor)
               else np.asarray(position))
        if arr.ndim == 1 and arr.size and arr.dtype.kind in "iu":
            return arr.astype(np.int64)
    raise InvalidParameterError(
        "position must be None, 'last', 'last_nonpad', an int (a position index, "
        "negative from the end), the name of a column of dict batches holding each "
        "example's position, or a 1-D array of int positions (one per example); got "
        f"{position!r}."
    )


def last_nonpad_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last nonzero entry of an attention mask ``(B, T)``.

    Right and left padding alike; a row without any nonzero entry gives ``-1`` (the
    last position). Tensor ops only (no data-dependent branching), so it runs under
    ``torch.func.vmap``.
    """
    T = mask.shape[-1]
    ar = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask != 0, ar, torch.full_like(ar, -1)).amax(-1)


def select_position(logits: torch.Tensor, pos: torch.Tensor | int) -> torch.Tensor:
    """Logits ``(B, T, V)`` at one position per example: ``(B, V)``.

    ``pos``: an int (negative from the end) or a ``(B,)`` integer tensor.
    """
    T = logits.shape[1]
    if isinstance(pos, int):
        if not -T <= pos < T:
            raise ValueError(f"position={pos} is out of range for sequences of length {T}.")
        return logits[:, pos, :]
    pos = pos.to(device=logits.device, dtype=torch.long)
    pos = torch.where(pos < 0, pos + T, pos)  # vmap-friendly wrap of negatives
    idx = pos.reshape(-1, 1, 1).expand(logits.shape[0], 1, logits.shape[2])
    return logits.gather(1, idx)[:, 0, :]


def _mask_of(batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"]
    return None


class PositionForward:
    """``forward(model, batch)`` that returns the logits at the explained position.

    Wraps the user's ``forward`` (or the default one), reads a model output's
    ``.logits``/``["logits"]`` and, for per-position logits ``(B, T, V)``, picks one
    position per example.

    Parameters
    ----------
    forward : callable or None
        The user's ``forward(model, batch)``; ``None``: the default forward.
    position : None, str, int or ndarray
        As validated by :func:`check_position`. An array means the batches are dicts
        ``{BATCH_KEY: batch, POSITION_KEY: positions}`` (see :func:`attach_positions`).
    """

    def __init__(self, forward, position):
        self.forward = forward if forward is not None else default_forward
        self.position = position

    def __call__(self, model, batch):
        pos: Any = self.position
        if isinstance(pos, np.ndarray):
            batch, pos = batch[BATCH_KEY], batch[POSITION_KEY]
        elif isinstance(pos, str) and pos not in _KEYWORDS:
            if not isinstance(batch, Mapping) or pos not in batch:
                keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise ValueError(
                    f"position={pos!r} names a column of dict batches holding each "
                    f"example's position, but the batch has no such key (got {keys}).")
            batch = dict(batch)
            pos = batch.pop(pos)
        logits = as_logits(self.forward(model, batch))
        if pos is None or logits.dim() != 3:
            if pos is not None and logits.dim() == 2:
                raise ValueError(
                    f"position={self._name()} picks one position of per-position logits "
                    "(batch, seq_len, vocab), but the model (or forward) returned logits "
                    f"of shape {tuple(logits.shape)}: leave position=None.")
            return logits
        if pos == "last":
            return logits[:, -1, :]
        if pos == "last_nonpad":
            mask = _mask_of(batch)
            if mask is None:
                raise ValueError(
                    "position='last_nonpad' reads each example's last non-padding token "
                    "from the batch's attention mask, but the batch has no "
                    "'attention_mask' tensor: pass dict batches such as a tokenizer's "
                    "output (input_ids and attention_mask), or use position='last' for "
                    "unpadded sequences.")
            if mask.shape[-1] != logits.shape[1]:
                raise ValueError(
                    f"the attention mask has {mask.shape[-1]} positions but the logits "
                    f"have {logits.shape[1]}.")
            return select_position(logits, last_nonpad_positions(mask))
        if isinstance(pos, int):
            return select_position(logits, pos)
        pos = torch.as_tensor(pos)
        if pos.dim() != 1 or pos.shape[0] != logits.shape[0]:
            raise ValueError(
                f"the positions of a batch must be one integer per example; got shape "
                f"{tuple(pos.shape)} for {logits.shape[0]} examples.")
        return select_position(logits, pos)

    def _name(self) -> str:
        return "array" if isinstance(self.position, np.ndarray) else repr(self.position)


def attach_positions(batches: Iterable, positions: np.ndarray) -> Iterator[dict]:
    """Each batch with the slice of ``positions`` that belongs to its examples, as
    ``{BATCH_KEY: batch, POSITION_KEY: tensor}`` (batches come in order)."""
    start = 0
    for batch in batches:
        n = batch_length(batch, "an array position is sliced per batch")
        if start + n > positions.shape[0]:
            raise ValueError(
                f"position holds {positions.shape[0]} positions but X has more examples; "
                "give one position per example of X.")
        yield {BATCH_KEY: batch,
               POSITION_KEY: torch.from_numpy(positions[start : start + n].copy())}
        start += n
