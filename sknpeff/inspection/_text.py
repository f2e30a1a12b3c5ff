"""Text examples for the report: token strings with the explained position marked."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["token_rows"]


def _as_list(seq) -> list:
    if hasattr(seq, "tolist"):  # a tensor or an array
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)):
        return [seq]
    return list(seq)


def _decoder(decode) -> Callable[[Any], str] | None:
    if decode is None:
        return None
    if callable(decode):
        return decode
    if isinstance(decode, (Sequence, Mapping, np.ndarray)):
        return lambda t: decode[t]
    raise ValueError(
        "decode must be None, a callable decode(token_id) -> str (e.g. "
        "lambda t: tokenizer.decode([t])), or a vocabulary (a list of token strings "
        f"indexed by id, or a dict); got {type(decode).__name__}.")


def token_rows(tokens, n: int, *, decode=None, positions=None) -> list[list[tuple[str, bool]]]:
    """Per example, its tokens as ``(text, is_explained)`` pairs.

    Parameters
    ----------
    tokens : sequence of length n
        Per example: a sequence of token strings, of token ids (with ``decode``), or
        one string (shown whole).
    n : int
        Number of examples.
    decode : callable, sequence or dict, default=None
        Turns a token id into its text: ``decode(token_id)``, or ``decode[token_id]``
        for a vocabulary. ``None``: tokens are shown with ``str``.
    positions : None, "last", int or array-like of int, default=None
        The explained position of each example (negative from the end), marked in the
        page. ``None`` and ``"last"``: the last token.

    Returns
    -------
    rows : list of list of (str, bool)
    """
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__"):
        raise ValueError("tokens must be a sequence with one entry per example.")
    if len(tokens) != n:
        raise ValueError(f"tokens must have {n} entries (one per example); got {len(tokens)}.")
    dec = _decoder(decode)
    if positions is None or (isinstance(positions, str) and positions == "last"):
        pos = np.full(n, -1)
    elif isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        pos = np.full(n, int(positions))
    else:
        pos = np.asarray(positions)
        if pos.shape != (n,) or pos.dtype.kind not in "iu":
            raise ValueError(
                f"positions must be None, 'last', an int or {n} int positions (one per "
                f"example); got {positions!r}.")
    rows = []
    for i in range(n):
        toks = _as_list(tokens[i])
        texts = [str(t) if dec is None or isinstance(t, str) else str(dec(t)) for t in toks]
        at = int(pos[i]) + (len(texts) if pos[i] < 0 else 0)
        rows.append([(t, j == at) for j, t in enumerate(texts)])
    return rows
