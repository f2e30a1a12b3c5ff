"""Images: batches in a common layout and their PNG encoding (with Pillow)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from ._validation import to_numpy

__all__ = ["as_image_batch", "png_bytes", "png_data_uri"]


def as_image_batch(images, n_examples: int | None = None) -> np.ndarray:
    """Images as ``(n, H, W)`` (grey) or ``(n, H, W, C)`` with C in {3, 4}, values in [0, 1].

    Parameters
    ----------
    images : array-like or torch.Tensor of shape (n, H, W), (n, C, H, W) or (n, H, W, C)
        Numbers; C in {1, 3, 4} (a single channel is dropped). 8-bit integers with no
        negative value are divided by 255; other values already in [0, 1] are kept, values
        outside are rescaled from their min-max range to [0, 1].
    n_examples : int, default=None
        Required number of images (the rows of ``W``); None: any.

    Returns
    -------
    images : ndarray of shape (n, H, W) or (n, H, W, C), dtype float64
    """
    arr = np.asarray(to_numpy(images))
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"images must be a numeric array, got dtype {arr.dtype}.")
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4):
            pass
        elif arr.shape[1] in (1, 3, 4):
            arr = np.moveaxis(arr, 1, -1)
        else:
            raise ValueError(
                "images of 4 dimensions must have 1, 3 or 4 channels (first or last), got "
                f"shape {arr.shape}."
            )
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 3:
        raise ValueError(
            "images must have shape (n, H, W), (n, C, H, W) or (n, H, W, C), got shape "
            f"{arr.shape}."
        )
    if n_examples is not None and arr.shape[0] != n_examples:
        raise ValueError(
            f"images must have {n_examples} entries (rows of W), got {arr.shape[0]}."
        )
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize == 1 and arr.min() >= 0:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("images must be finite.")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one image with values in [0, 1] as PNG (8 bits per channel).

    Parameters
    ----------
    image : ndarray of shape (H, W), (H, W, 3) or (H, W, 4)
        Grey, RGB or RGBA values in [0, 1]; each is rounded to the nearest of 256 levels.

    Returns
    -------
    png : bytes
        The PNG file.
    """
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # mode L, RGB or RGBA from the shape
    return buffer.getvalue()


def png_data_uri(image: np.ndarray) -> str:
    """A ``data:`` URI holding :func:`png_bytes` of ``image``, for an ``<img src>``.

    Parameters
    ----------
    image : ndarray of shape (H, W), (H, W, 3) or (H, W, 4)
        Values in [0, 1].

    Returns
    -------
    uri : str
    """
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
