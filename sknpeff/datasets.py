"""Small planted problems, models and data for demos, tests and the gallery.

Everything here is generated or bundled: nothing is downloaded, and every function runs in
seconds on a laptop CPU.

* :func:`make_planted_lowrank` and :func:`make_planted_diagonal` build PEF matrices whose
  NPEFF decomposition is known exactly (LRM-PEF and D-PEF layouts of ``DESIGN.md``).
* :func:`load_digits_split`, :func:`make_digits_cnn` and :func:`train_digits_cnn` give a
  tiny convolutional classifier of scikit-learn's bundled 8x8 digits (about 97% held-out
  accuracy after a few seconds of CPU training).
* :func:`make_gated_experts` builds a classifier whose experts are switched on by input
  bits, so the sub-computation used by each example is known by construction.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state
from torch import nn

__all__ = [
    "DigitsCNN",
    "GatedExperts",
    "load_digits_split",
    "make_digits_cnn",
    "make_gated_experts",
    "make_planted_diagonal",
    "make_planted_lowrank",
    "train_digits_cnn",
]


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_int(value, name: str, *, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


def _check_n_active(n_active, high: int, high_name: str) -> tuple[int, int]:
    try:
        lo, hi = n_active
    except (TypeError, ValueError):
        raise ValueError(
            f"n_active must be a pair (min, max) of integers, got {n_active!r}."
        ) from None
    lo = _check_int(lo, "n_active[0]", low=1)
    hi = _check_int(hi, "n_active[1]", low=1)
    if lo > hi:
        raise ValueError(f"n_active must satisfy min <= max, got {n_active!r}.")
    if hi > high:
        raise ValueError(f"n_active[1] must be <= {high_name} (= {high}), got {hi}.")
    return lo, hi


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}.")
    return dt


def _sparse_supports(rng, n_rows: int, n_params: int, support_size: int) -> list[np.ndarray]:
    return [np.sort(rng.choice(n_params, size=support_size, replace=False)) for _ in range(n_rows)]


def _random_orthogonal(rng, n: int) -> np.ndarray:
    """Haar-distributed random orthogonal ``n x n`` matrix (QR with sign correction)."""
    z = rng.standard_normal((n, n))
    q, r = np.linalg.qr(z)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d


def _active_weights(rng, n_examples: int, n_components: int, lo: int, hi: int) -> np.ndarray:
    W = np.zeros((n_examples, n_components))
    for i in range(n_examples):
        s = rng.randint(lo, hi + 1)
        active = rng.choice(n_components, size=s, replace=False)
        W[i, active] = rng.uniform(0.5, 1.5, size=s)
    return W


# ---------------------------------------------------------------------------------------------
# Planted problems
# ---------------------------------------------------------------------------------------------


def make_planted_lowrank(
    n_examples: int = 600,
    n_params: int = 3000,
    n_classes: int = 3,
    n_components: int = 8,
    support_size: int = 150,
    n_active: tuple[int, int] = (1, 3),
    normalize: bool = True,
    random_state=None,
    dtype=np.float32,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Generate LRM-PEFs that are exact non-negative sums of planted rank-1 components.

    Each component ``g_k`` is a unit-norm vector supported on ``support_size`` random
    parameters (Gaussian values on the support). Example *i* activates between
    ``n_active[0]`` and ``n_active[1]`` components (set ``S``) with weights
    ``W_ik ~ U(0.5, 1.5)``, so that its PEF is ``F_i = sum_k W_ik g_k g_k^T``. The PEF is
    stored as ``n_classes`` vectors ``a_ij`` with ``sum_j a_ij a_ij^T = F_i`` exactly, but
    mixed so that they are not the ``g_k`` themselves: with
    ``B = diag(sqrt(W_iS)) G_S`` padded with zero rows to ``n_classes`` rows and a random
    orthogonal ``U`` (``n_classes x n_classes``), ``A_i = U B``.

    Parameters
    ----------
    n_examples : int, default=600
        Number of examples (rows of ``X``).
    n_params : int, default=3000
        Number of model parameters ``m``.
    n_classes : int, default=3
        Number of class slots ``c`` per example.
    n_components : int, default=8
        Number of planted components ``r``.
    support_size : int, default=150
        Number of nonzero parameters of each component.
    n_active : tuple of int, default=(1, 3)
        Inclusive range of the number of active components per example; the maximum must
        not exceed ``n_classes`` or ``n_components``.
    normalize : bool, default=True
        Scale each example so that ``||F_i||_F = 1`` (``A_i`` is divided by
        ``sqrt(||F_i||_F)`` and ``W_i`` by ``||F_i||_F``); the returned ``W`` is scaled.
    random_state : int, RandomState instance or None, default=None
        Seed for reproducible output.
    dtype : {np.float32, np.float64}, default=np.float32
        Floating dtype of ``X``, ``W`` and ``G``.

    Returns
    -------
    X : scipy.sparse.csr_matrix of shape (n_examples, n_classes * n_params)
        LRM-PEFs: row *i* is ``A_i`` flattened row-major (slot *j* at columns
        ``j * n_params`` to ``(j + 1) * n_params - 1``). Indices sorted, no explicit zeros.
    W : ndarray of shape (n_examples, n_components)
        Non-negative planted coefficients.
    G : ndarray of shape (n_components, n_params)
        Planted unit-norm components.

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_lowrank
    >>> X, W, G = make_planted_lowrank(n_examples=20, n_params=50, support_size=10,
    ...                                random_state=0)
    >>> X.shape, W.shape, G.shape
    ((20, 150), (20, 8), (8, 50))
    """
    n_examples = _check_int(n_examples, "n_examples")
    n_params = _check_int(n_params, "n_params")
    n_classes = _check_int(n_classes, "n_classes")
    n_components = _check_int(n_components, "n_components")
    support_size = _check_int(support_size, "support_size", high=n_params)
    if n_classes <= n_components:
        lo, hi = _check_n_active(n_active, n_classes, "n_classes")
    else:
        lo, hi = _check_n_active(n_active, n_components, "n_components")
    dt = _check_dtype(dtype)
    rng = check_random_state(random_state)

    supports = _sparse_supports(rng, n_components, n_params, support_size)
    G = np.zeros((n_components, n_params))
    for k, supp in enumerate(supports):
        v = rng.standard_normal(support_size)
        G[k, supp] = v / np.linalg.norm(v)

    W = _active_weights(rng, n_examples, n_components, lo, hi)

    indptr = np.zeros(n_examples + 1, dtype=np.int64)
    indices_parts: list[np.ndarray] = []
    data_parts: list[np.ndarray] = []
    for i in range(n_examples):
        active = np.flatnonzero(W[i])
        cols = np.unique(np.concatenate([supports[k] for k in active]))
        B = np.zeros((n_classes, cols.size))
        B[: active.size] = np.sqrt(W[i, active])[:, None] * G[np.ix_(active, cols)]
        A = _random_orthogonal(rng, n_classes) @ B
        if normalize:
            gram = A @ A.T
            fro = np.sqrt(np.sum(gram * gram))
            A /= np.sqrt(fro)
            W[i] /= fro
        idx = (np.arange(n_classes)[:, None] * n_params + cols[None, :]).ravel()
        vals = A.ravel()
        keep = vals != 0
        indices_parts.append(idx[keep])
        data_parts.append(vals[keep])
        indptr[i + 1] = indptr[i] + int(keep.sum())

    indices = np.concatenate(indices_parts) if indices_parts else np.zeros(0, np.int64)
    data = np.concatenate(data_parts) if data_parts else np.zeros(0)
    X = sp.csr_matrix((data.astype(dt), indices, indptr), shape=(n_examples, n_classes * n_params))
    X.eliminate_zeros()  # values that underflow in the cast
    X.sort_indices()
    return X, W.astype(dt), G.astype(dt)


def make_planted_diagonal(
    n_examples: int = 800,
    n_params: int = 4000,
    n_components: int = 10,
    support_size: int = 400,
    n_active: tuple[int, int] = (1, 3),
    normalize: bool = True,
    random_state=None,
    dtype=np.float32,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Generate D-PEFs that are exact non-negative combinations of planted components.

    Each component ``h_k`` (row of ``H``) is non-negative, supported on ``support_size``
    random parameters (values ``|N(0, 1)|`` on the support) and has unit L2 norm. Example
    *i* activates between ``n_active[0]`` and ``n_active[1]`` components with weights
    ``W_ik ~ U(0.5, 1.5)``, and ``X = W H`` exactly.

    Parameters
    ----------
    n_examples : int, default=800
        Number of examples (rows of ``X``).
    n_params : int, default=4000
        Number of model parameters.
    n_components : int, default=10
        Number of planted components.
    support_size : int, default=400
        Number of nonzero parameters of each component.
    n_active : tuple of int, default=(1, 3)
        Inclusive range of the number of active components per example.
    normalize : bool, default=True
        Scale each row of ``X`` to unit L2 norm (and the row of ``W`` by the same factor).
    random_state : int, RandomState instance or None, default=None
        Seed for reproducible output.
    dtype : {np.float32, np.float64}, default=np.float32
        Floating dtype of ``X``, ``W`` and ``H``.

    Returns
    -------
    X : scipy.sparse.csr_matrix of shape (n_examples, n_params)
        Non-negative D-PEFs, ``X = W H``. Indices sorted, no explicit zeros.
    W : ndarray of shape (n_examples, n_components)
        Non-negative planted coefficients.
    H : ndarray of shape (n_components, n_params)
        Non-negative planted components with unit L2 rows.

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_diagonal
    >>> X, W, H = make_planted_diagonal(n_examples=20, n_params=50, support_size=10,
    ...                                 random_state=0)
    >>> X.shape, W.shape, H.shape
    ((20, 50), (20, 10), (10, 50))
    """
    n_examples = _check_int(n_examples, "n_examples")
    n_params = _check_int(n_params, "n_params")
    n_components = _check_int(n_components, "n_components")
    support_size = _check_int(support_size, "support_size", high=n_params)
    lo, hi = _check_n_active(n_active, n_components, "n_components")
    dt = _check_dtype(dtype)
    rng = check_random_state(random_state)

    H = np.zeros((n_components, n_params))
    for k, supp in enumerate(_sparse_supports(rng, n_components, n_params, support_size)):
        v = np.abs(rng.standard_normal(support_size)) + 1e-3
        H[k, supp] = v / np.linalg.norm(v)

    W = _active_weights(rng, n_examples, n_components, lo, hi)
    X = sp.csr_matrix(sp.csr_matrix(W) @ sp.csr_matrix(H))
    if normalize:
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
        scale = 1.0 / norms
        X = sp.csr_matrix(sp.diags(scale) @ X)
        W = W * scale[:, None]
    X = X.astype(dt)
    X.eliminate_zeros()
    X.sort_indices()
    return X, W.astype(dt), H.astype(dt)


# ---------------------------------------------------------------------------------------------
# Digits: bundled data and a tiny CNN
# ---------------------------------------------------------------------------------------------


def _torch_seed(random_state) -> int:
    """A torch seed from an int, a RandomState or None (drawn from the global NumPy RNG)."""
    if random_state is None or isinstance(random_state, np.random.RandomState):
        return int(check_random_state(random_state).randint(0, 2**31 - 1))
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise ValueError(
            f"random_state must be None, an int or a RandomState, got {random_state!r}."
        )
    return int(random_state)


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
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise ValueError(f"test_size must be a float in (0, 1) or an int, got {test_size!r}.")
    if isinstance(test_size, numbers.Integral):
        if not 10 <= test_size <= 1787:
            raise ValueError(f"test_size must be in [10, 1787] as an int, got {test_size}.")
    elif not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1) as a float, got {test_size}.")
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
        """Return the logits, shape ``(batch, 10)``, of images of shape ``(batch, 1, 8, 8)``."""
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
    seed = _torch_seed(random_state)
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
        away from zero (the demo's setting, see :func:`sknpeff._demo.run_demo`).
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
    epochs = _check_int(epochs, "epochs")
    batch_size = _check_int(batch_size, "batch_size")
    if not (isinstance(learning_rate, numbers.Real) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive float, got {learning_rate!r}.")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
            or not 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}.")
    seed = _torch_seed(random_state)
    split = load_digits_split(test_size=test_size, random_state=seed)
    model = make_digits_cnn(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))
    X, y = split.X_train, split.y_train
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest and robust to a busy CPU
    try:
        _train_loop(
            model, opt, loss_fn, X, y, split, gen, epochs, batch_size, learning_rate, verbose
        )
    finally:
        torch.set_num_threads(n_threads)
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


# ---------------------------------------------------------------------------------------------
# Gated experts: a classifier whose sub-computations are known by construction
# ---------------------------------------------------------------------------------------------


class _Bias(nn.Module):
    """A learned bias vector broadcast over the batch (parameter ``bias``)."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


class GatedExperts(nn.Module):
    """A classifier whose experts are switched on and off by binary input bits.

    Inputs are vectors ``x = [b_0, ..., b_{E-1}, z_1, ..., z_N]``: ``E`` binary concept
    bits followed by ``N`` noise features. The logits are::

        base(x) + sum_e b_e * expert_e(x)

    where ``base`` is a shared bias vector (or, with ``shared_linear=True``, a shared
    linear layer of all inputs) and ``expert_e`` a small MLP (linear, tanh, linear) with its
    own parameters. An expert whose bit is off contributes nothing to the output and
    receives an exactly zero gradient, so the parameters an example uses are known.

    Parameters
    ----------
    n_experts : int, default=6
        Number of experts ``E`` (and of concept bits).
    n_noise : int, default=10
        Number of noise features ``N``.
    n_classes : int, default=3
        Number of output classes.
    hidden : int, default=8
        Hidden width of each expert.
    shared_linear : bool, default=False
        Make ``base`` a linear layer of all inputs (parameters ``base.weight`` and
        ``base.bias``) instead of a bias alone (``base.bias``). Its gradient is large on
        every example, so it competes with the experts for components.

    Examples
    --------
    >>> import torch
    >>> from sknpeff.datasets import GatedExperts
    >>> GatedExperts()(torch.zeros(4, 16)).shape
    torch.Size([4, 3])
    """

    def __init__(
        self,
        n_experts: int = 6,
        n_noise: int = 10,
        n_classes: int = 3,
        hidden: int = 8,
        shared_linear: bool = False,
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.n_noise = n_noise
        n_features = n_experts + n_noise
        self.base = nn.Linear(n_features, n_classes) if shared_linear else _Bias(n_classes)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
            for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits, shape ``(batch, n_classes)``, of inputs ``(batch, n_features)``."""
        out = self.base(x)
        for e, expert in enumerate(self.experts):
            out = out + x[:, e : e + 1] * expert(x)
        return out


def make_gated_experts(
    n_experts: int = 6,
    n_noise: int = 10,
    n_classes: int = 3,
    hidden: int = 8,
    *,
    concept_prob: float = 0.3,
    expert_scale: float = 2.0,
    base_scale: float = 0.5,
    shared_linear: bool = False,
    random_state=0,
) -> tuple[GatedExperts, Callable[..., tuple[torch.Tensor, np.ndarray]], dict[int, list[str]]]:
    """Build a :class:`GatedExperts` classifier with known ground truth for NPEFF.

    The weights are random (no training is needed: the model *is* the truth). Expert ``e``
    owns a disjoint block of parameters and is used exactly by the examples whose concept
    bit ``e`` is on, so a good decomposition has components whose parameters lie in one
    expert's block and whose top examples all carry that expert's concept; perturbing such
    a component should move those examples' predictions and leave the others nearly alone.

    Parameters
    ----------
    n_experts : int, default=6
        Number of experts (and of concept bits).
    n_noise : int, default=10
        Number of Gaussian noise features appended to the bits.
    n_classes : int, default=3
        Number of classes.
    hidden : int, default=8
        Hidden width of each expert.
    concept_prob : float, default=0.3
        Probability that a concept bit is on (bits are independent).
    expert_scale : float, default=2.0
        Standard deviation scale of the experts' output weights (larger makes the experts
        dominate the prediction).
    base_scale : float, default=0.5
        Standard deviation scale of the shared base's parameters.
    shared_linear : bool, default=False
        Use a shared linear layer of all inputs as the base instead of a shared bias (see
        :class:`GatedExperts`); its parameters then carry much of every example's Fisher.
    random_state : int, RandomState instance or None, default=0
        Seed of the weights. The global torch RNG state is left untouched.

    Returns
    -------
    model : GatedExperts
        The model, float32, in eval mode.
    sample : callable
        ``sample(n_samples, random_state=None) -> (X, concepts)``: ``X`` is a float32
        tensor of shape ``(n_samples, n_experts + n_noise)`` (bits first, then
        ``N(0, 1)`` noise) and ``concepts`` an int64 ndarray of shape
        ``(n_samples, n_experts)`` holding the bits.
    expert_params : dict of int to list of str
        For each expert, the names (as in ``model.named_parameters()``) of its parameters.
        The remaining parameters (``base.bias``, and ``base.weight`` when
        ``shared_linear=True``) are shared by all examples.

    Examples
    --------
    >>> from sknpeff.datasets import make_gated_experts
    >>> model, sample, expert_params = make_gated_experts(random_state=0)
    >>> X, concepts = sample(100, random_state=0)
    >>> tuple(X.shape), concepts.shape
    ((100, 16), (100, 6))
    >>> expert_params[0]
    ['experts.0.0.weight', 'experts.0.0.bias', 'experts.0.2.weight', 'experts.0.2.bias']
    """
    n_experts = _check_int(n_experts, "n_experts")
    n_noise = _check_int(n_noise, "n_noise", low=0)
    n_classes = _check_int(n_classes, "n_classes", low=2)
    hidden = _check_int(hidden, "hidden")
    if not (isinstance(concept_prob, numbers.Real) and 0.0 < concept_prob < 1.0):
        raise ValueError(f"concept_prob must be a float in (0, 1), got {concept_prob!r}.")
    for name, value in (("expert_scale", expert_scale), ("base_scale", base_scale)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and value >= 0):
            raise ValueError(f"{name} must be a non-negative float, got {value!r}.")
    seed = _torch_seed(random_state)
    n_features = n_experts + n_noise

    model = GatedExperts(n_experts, n_noise, n_classes, hidden, shared_linear=bool(shared_linear))
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    with torch.no_grad():
        if shared_linear:
            normal_(model.base.weight, base_scale / np.sqrt(n_features))
        normal_(model.base.bias, base_scale)
        for expert in model.experts:
            normal_(expert[0].weight, 1.5 / np.sqrt(n_features))
            normal_(expert[0].bias, 0.5)
            normal_(expert[2].weight, expert_scale / np.sqrt(hidden))
            normal_(expert[2].bias, expert_scale / 2)
    model.eval()

    expert_params = {
        e: [f"experts.{e}.{name}" for name, _ in model.experts[e].named_parameters()]
        for e in range(n_experts)
    }

    def sample(n_samples: int, random_state=None) -> tuple[torch.Tensor, np.ndarray]:
        """Draw ``n_samples`` inputs and their concept bits (see :func:`make_gated_experts`)."""
        n_samples = _check_int(n_samples, "n_samples")
        rng = check_random_state(random_state)
        concepts = (rng.random_sample((n_samples, n_experts)) < concept_prob).astype(np.int64)
        noise = rng.standard_normal((n_samples, n_noise))
        X = np.hstack([concepts, noise]).astype(np.float32)
        return torch.from_numpy(X), concepts

    return model, sample, expert_params
