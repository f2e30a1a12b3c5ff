"""Scikit-learn's bundled 8x8 digits, a tiny CNN for them and its training."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch
from torch import nn

from ..utils import InvalidParameterError, check_float, check_int, limit_threads
from ._random import torch_seed

__all__ = ["DigitsCNN", "load_digits_split", "make_digits_cnn", "train_digits_cnn"]


def load_digits_split(test_size: float | int = 0.25, random_state=0) -> Bunch:
    """Load scikit-learn's bundled 8x8 digits as torch tensors, split into train and test.

    The data ship with scikit-learn, so nothing is downloaded. Pixel values (0-16) are
    scaled to [0, 1]. The split is stratified by label.

    Parameters
    ----------
    test_size : float or int, default=0.25
        Fraction (float in (0, 1)) or number (int) of held-out examples.
    random_state : int, RandomState instance or None, default=0
        Seed of the split.

    Returns
    -------
    split : sklearn.utils.Bunch
        With ``X_train`` and ``X_test`` (float32 tensors of shape ``(n, 1, 8, 8)``),
        ``y_train`` and ``y_test`` (int64 tensors of shape ``(n,)``) and ``target_names``
        (ndarray of the ten digit labels).

    Examples
    --------
    >>> from sknpeff.datasets import load_digits_split
    >>> split = load_digits_split()
    >>> tuple(split.X_train.shape), split.y_train.dtype
    ((1347, 1, 8, 8), torch.int64)
    """
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        test_size = check_int(test_size, "test_size", low=10, high=1787)
    else:
        test_size = check_float(test_size, "test_size", low=0.0, high=1.0, strict=True)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, random_state=random_state, stratify=labels
    )
    return Bunch(
        X_train=torch.from_numpy(np.ascontiguousarray(X_tr)),
        X_test=torch.from_numpy(np.ascontiguousarray(X_te)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        target_names=digits.target_names.copy(),
    )


class DigitsCNN(nn.Module):
    """A 3,818-parameter convolutional classifier for 8x8 digit images.

    ``conv1`` (1 -> 8 channels, 3x3, padding 1), ReLU, ``conv2`` (8 -> 16 channels, 3x3,
    stride 2, padding 1), ReLU, flatten (16 x 4 x 4 = 256) and ``fc`` (256 -> 10 logits).

    Examples
    --------
    >>> import torch
    >>> from sknpeff.datasets import DigitsCNN
    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images.

        Parameters
        ----------
        x : torch.Tensor of shape (batch, 1, 8, 8)
            Images.

        Returns
        -------
        logits : torch.Tensor of shape (batch, 10)
        """
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def make_digits_cnn(random_state=0) -> DigitsCNN:
    """Build an untrained :class:`DigitsCNN` with reproducible initial weights.

    The global torch RNG state is left untouched.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=0
        Seed of the weight initialisation.

    Returns
    -------
    model : DigitsCNN
        The untrained model (float32, CPU, training mode).

    Examples
    --------
    >>> from sknpeff.datasets import make_digits_cnn
    >>> model = make_digits_cnn(random_state=0)
    >>> sum(p.numel() for p in model.parameters())
    3818
    """
    seed = torch_seed(random_state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
    return model


def train_digits_cnn(
    random_state=0,
    epochs: int = 30,
    *,
    test_size: float | int = 0.25,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    label_smoothing: float = 0.0,
    verbose: int = 0,
) -> tuple[DigitsCNN, Bunch]:
    """Train :class:`DigitsCNN` on the digits training split (a few seconds on one CPU core).

    Training uses Adam with a fixed seed for the initialisation and the mini-batch order,
    so repeated calls on the same machine give the same model. It runs on one CPU thread
    (``torch.set_num_threads(1)`` for its duration, restored afterwards): with batches this
    small that is the fastest setting and the least sensitive to a busy machine. The global
    torch RNG state is left untouched.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=0
        Seed of the initialisation, the batch order and the split.
    epochs : int, default=30
        Passes over the training split.
    test_size : float or int, default=0.25
        Held-out part, as in :func:`load_digits_split`.
    batch_size : int, default=64
        Mini-batch size.
    learning_rate : float, default=1e-2
        Adam step size (divided by 10 for the last quarter of the epochs).
    label_smoothing : float, default=0.0
        Label smoothing of the cross-entropy loss, in ``[0, 1)``. Without it the model
        grows near-certain on most training digits (median top probability above 0.9999),
        whose Fishers are then almost zero; ``0.1`` keeps every prediction's Fisher well
        away from zero (the setting of ``python -m sknpeff demo``).
    verbose : int, default=0
        If positive, print the loss and held-out accuracy every ``10`` epochs.

    Returns
    -------
    model : DigitsCNN
        The trained model, in eval mode, with ``requires_grad`` left on.
    split : sklearn.utils.Bunch
        The split of :func:`load_digits_split`, plus ``test_accuracy`` (float).

    Examples
    --------
    >>> from sknpeff.datasets import train_digits_cnn
    >>> model, split = train_digits_cnn(random_state=0)  # doctest: +SKIP
    >>> split.test_accuracy > 0.95  # doctest: +SKIP
    True
    """
    epochs = check_int(epochs, "epochs", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    learning_rate = check_float(learning_rate, "learning_rate", low=0.0, strict=True)
    label_smoothing = check_float(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    if label_smoothing == 1.0:
        raise InvalidParameterError("label_smoothing must be < 1; got 1.0.")
    seed = torch_seed(random_state)
    split = load_digits_split(test_size=test_size, random_state=seed)
    model = make_digits_cnn(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    X, y = split.X_train, split.y_train
    # tiny batches: one thread is fastest and robust to a busy CPU
    with limit_threads(1, blas_threads=False):
        _train_loop(
            model, opt, loss_fn, X, y, split, gen, epochs, batch_size, learning_rate, verbose
        )
    model.eval()
    split.test_accuracy = _accuracy(model, split.X_test, split.y_test)
    return model, split


def _train_loop(
    model, opt, loss_fn, X, y, split, gen, epochs, batch_size, learning_rate, verbose
) -> None:
    n = X.shape[0]
    model.train()
    for epoch in range(epochs):
        if epoch == (3 * epochs) // 4:
            for group in opt.param_groups:
                group["lr"] = learning_rate / 10
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        if verbose > 0 and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            acc = _accuracy(model, split.X_test, split.y_test)
            model.train()
            print(f"Epoch {epoch + 1:02d}: loss {total / n:.4f}, held-out accuracy {acc:.4f}")


def _accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).float().mean())
