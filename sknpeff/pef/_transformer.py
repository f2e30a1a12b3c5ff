"""PEFTransformer: examples in, per-example Fishers out, as a scikit-learn transformer.

Parameters, validation, ``fit``/``transform``/``compute``, batching, worker threads,
progress and writing to a store. Each batch goes through the engine
(:mod:`sknpeff.pef._engine`).

With ``n_jobs > 1`` on a CPU, batches run concurrently in worker threads, each with its
own engine (buffers, hooks that record only their own thread's forward pass) and an
equal share of torch's intra-op threads: many of the per-batch ops (index plans, the
selection, small products) use two cores poorly, two batches at once use them fully. A
batch that turns out to need the generic path (which swaps the model's parameters)
hands itself and the later batches back to the calling thread.
"""

from __future__ import annotations

import itertools
import queue
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from ..layout import ParameterLayout
from ..utils import (
    InvalidParameterError,
    check_choice,
    check_eval_mode,
    check_float,
    check_int,
    csr_from_parts,
    limit_threads,
    tag_pef_matrix,
    user_stacklevel,
)
from ._classes import CLASS_AXES, OUTPUTS, n_class_slots, predictions, resolve_output
from ._engine import Engine, NeedsOneThread
from ._inputs import (
    as_logits,
    batch_length,
    check_finite,
    check_logits,
    check_not_probabilities,
    first_batch,
    iter_batches,
    n_examples,
    to_device,
)
from ._position import PositionForward, attach_positions, check_position
from ._projection import Projection
from ._result import PEFResult, concat_results

__all__ = ["PEFTransformer"]

_END = object()  # end of an iterator
#: the most concurrent batches ``n_jobs="auto"`` runs (memory grows with each)
AUTO_MAX_JOBS = 4


class PEFTransformer(TransformerMixin, BaseEstimator):
    """Per-example Fisher (PEF) matrices of a PyTorch classifier, sparse.

    Turns examples into diagonal (D-PEF) or low-rank (LRM-PEF) per-example Fishers,
    normalized and sparsified to their ``n_values`` largest entries, ready for
    ``DiagonalNPEFF`` / ``LowRankNPEFF`` in a :class:`~sklearn.pipeline.Pipeline`.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier in eval mode returning logits ``(batch, n_outputs)`` (or an object
        with a ``.logits`` attribute). It is never modified.
    kind : {"diagonal", "low_rank"}, default="diagonal"
        ``"diagonal"``: row ``i`` is ``f_i = sum_j a_ij ** 2`` (width ``n_params_``).
        ``"low_rank"``: row ``i`` is the flattened ``(n_classes_, n_params_)`` matrix of the
        ``a_ij = sqrt(p_j) grad log p_j``, class slots by descending probability (other
        slot vectors with ``class_axis``).
    n_values : int, default=65536
        Number of entries of largest magnitude kept per row; with
        ``compression="projection"``, the projected dimension ``d`` per class slot.
    n_classes : int, default=None
        Number of class slots per example (one backward pass each). ``None``: all
        outputs of the model (``class_axis="top"``), the exact Fisher's ``C - 1``
        eigenvectors (``"eigen"``); ``"sample"`` and ``"project"`` need it.
    class_axis : {"top", "eigen", "sample", "project"}, default="top"
        How the ``n_classes`` slots represent the Fisher
        ``F = J^T (diag(p) - p p^T) J`` (``J`` the logits' Jacobian).
        ``"top"``: the ``a_ij`` of the most probable classes (exact on what it keeps).
        ``"eigen"``: ``J^T sqrt(lambda_k) u_k`` for the largest eigenvalues of
        ``diag(p) - p p^T`` (the optimal truncation; with ``n_classes=None`` exactly
        ``F`` with ``C - 1`` slots, one for a binary softmax; costs a ``C x C``
        eigendecomposition per example). ``"sample"``: ``n_classes`` draws
        ``y ~ p(y|x)``, slots ``grad log p_y / sqrt(n_classes)``. ``"project"``:
        ``n_classes`` Gaussian combinations ``sum_j w_j a_ij / sqrt(n_classes)``.
        Both random ones are unbiased estimates of ``F`` for any ``n_classes``. With
        sigmoid outputs ``"eigen"`` is ``"top"`` and ``"sample"`` draws every label.
    min_class_prob : float, default=None
        Drop classes whose probability is below this threshold (their slots stay empty).
        Softmax outputs and ``class_axis="top"`` only.
    random_state : int, RandomState instance or None, default=None
        Seed of the ``"sample"`` and ``"project"`` draws. Example ``i`` draws from a
        generator seeded with ``(seed, i)``: results do not depend on ``batch_size`` or
        ``n_jobs``. ``None``: a new seed for every computation.
    output : {"auto", "softmax", "sigmoid"}, default="auto"
        The distribution the logits parametrize. ``"softmax"``: one categorical
        distribution over the outputs (a multi-class classifier). ``"sigmoid"``: every
        logit ``z_c`` is an independent Bernoulli variable with ``s_c = sigmoid(z_c)``
        (a binary classifier with one logit, ``BCEWithLogitsLoss``; or a multi-label
        head), whose Fisher is ``sum_c s_c (1 - s_c) grad z_c grad z_c^T``: one slot per
        logit, by decreasing weight ``s_c (1 - s_c)``, so a binary classifier needs one
        vector per example. ``"auto"``: sigmoid for a model with one logit, softmax
        otherwise.
    normalize : bool, default=True
        Divide each PEF by its Frobenius norm (low rank: the ``a_ij`` by its square root)
        before sparsification.
    min_norm : float, default=None
        PEFs whose Frobenius norm is below this value are stored as empty rows (their
        norms are still returned, and the count is reported in a warning). A model
        near-certain of an example has an almost-zero Fisher for it, whose normalized
        entries are mostly rounding noise; pick the floor from the ``norms`` of a first
        :meth:`compute` (e.g. a small fraction of their median). ``None``: keep every
        nonzero PEF.
    params : list of str or callable, default=None
        Parameters to include: names, or a predicate ``(name, param) -> bool``.
        ``None``: every parameter with ``requires_grad=True``.
    forward : callable, default=None
        ``forward(model, batch) -> logits`` for models with another signature. Default:
        ``model(batch)``, ``model(**batch)`` for dicts, ``model(batch[0])`` for
        ``(inputs, targets)`` tuples (and lists), ``model(texts)`` for a list of strings.
        The output may also be an object with a ``.logits`` attribute (transformers). A
        model with one logit is a binary classifier with a sigmoid output (see
        ``output``).
    position : None, "last", "last_nonpad", int, str or array-like of int, default=None
        For sequence models returning per-position logits ``(batch, seq_len, vocab)``
        (a language model's next-token logits, a token classifier): the position
        explained, one per example. ``"last"``: the last position (unpadded or
        left-padded sequences); ``"last_nonpad"``: each example's last non-padding
        token, read from the batch's ``attention_mask`` (right or left padding); an int:
        that index (negative from the end); a str: the key of dict batches holding each
        example's position (removed before the forward pass); an array: one position
        per example of ``X`` (the same ``X`` at every call). ``None``: the model returns
        ``(batch, n_outputs)`` logits.
    batch_size : int, default=32
        Examples per forward/backward pass; bounds the memory used.
    n_jobs : int, "auto" or None, default="auto"
        Batches computed at once on a CPU, each in its own thread with an equal share of
        torch's intra-op threads (restored afterwards). ``None``: 1 (one batch at a time
        on all of torch's threads); ``-1``: one per intra-op thread
        (``torch.get_num_threads()``); ``"auto"``: one per intra-op thread, at most
        ``4`` (so that memory, which grows to ``n_jobs`` batches' buffers, stays
        bounded on many-core machines). The engine runs many small parallel regions per
        example (one backward per class slot, per-layer products, selections), each
        ending at a barrier that waits for a descheduled thread when the cores are busy;
        single-threaded jobs have no such barrier. On 2 cores, for a 17M-parameter
        BERT-style classifier (``benchmarks/bench_threads.py``), one job with 2 threads
        reached 0.89 of two jobs' examples/s on an idle machine and 0.44 beside two busy
        processes; one thread reached 0.56 and 0.68. Diagonal PEFs of small models were
        3-10% slower with two jobs than with one on an idle machine
        (``benchmarks/bench_pef.py``): measure on your model.
        Results and their order do not depend on it. It has no effect on a GPU, or
        when a parameter needs the generic ``torch.func`` path (which swaps the model's
        parameters while it runs): a batch found to need it on a worker thread is run
        again, with every later batch, on the calling thread. With ``n_jobs`` other than
        ``None`` or ``1``, a custom ``forward`` must be thread-safe (pass
        ``n_jobs=None`` if it is not).
    device : str or torch.device, default=None
        Where to compute; must be the device of the model's parameters (``None``: that
        device). Inputs are moved there.
    dtype : {"float32", "float64"}, default="float32"
        dtype of the returned PEF values. Gradients are computed in the model's dtype.
    compression : {"topk", "projection"}, default="topk"
        How each PEF is made small. ``"topk"``: a sparse row keeping its ``n_values``
        entries of largest magnitude. ``"projection"`` (low rank only): a dense row whose
        slot ``j`` is ``R a_ij`` for a seeded random operator ``R`` of ``n_values`` rows
        (``projection_``), computed per layer without forming the gradient; the
        factorization then runs on dense input and components are brought back to
        parameter space with :func:`~sknpeff.pef.recover_components`.
    projection_seed : int, default=0
        Seed of the random projection (``compression="projection"``).
    allow_train_mode : bool, default=False
        Accept a model in training mode (dropout makes the PEFs random). Batch norm in
        training mode is always refused: it couples the examples of a batch.
    verbose : int, default=0
        Show a progress bar (tqdm) when positive.

    Attributes
    ----------
    layout_ : ParameterLayout
        Flat order of the selected parameters (the column order).
    n_params_ : int
        Number of selected parameter entries.
    n_outputs_ : int
        Number of logits of the model.
    n_classes_ : int
        Number of class slots (low rank); pass it to ``LowRankNPEFF(n_classes=...)``.
    output_ : {"softmax", "sigmoid"}
        The output distribution used (``output`` with ``"auto"`` resolved).
    n_features_out_ : int
        Width of the PEF rows.
    projection_ : Projection or None
        The random operator of ``compression="projection"`` (``None`` otherwise).

    Notes
    -----
    The examples ``X`` (of :meth:`fit`, :meth:`compute`, :meth:`iter_compute`,
    :meth:`transform`) may be:

    * a tensor or array batched along its first axis (a list of equal-length lists of
      numbers is read as the rows of an array);
    * a dict of such arrays, such as a tokenizer's padded output (``model(**batch)``);
    * a tuple of such arrays with one first dimension: columns such as
      ``(inputs, targets)``, as given to ``TensorDataset``. Batches are tuples of slices,
      and the default forward uses ``batch[0]``. A list is never read as columns;
    * a list of per-example items (dicts of tensors, ``(input, target)`` pairs),
      stacked with torch's ``default_collate``: items of different lengths must be padded,
      e.g. by a DataLoader whose ``collate_fn`` pads;
    * a list (or array) of strings: batches are lists of strings, passed as they are to
      a tokenizing ``forward``, e.g. ``forward=lambda m, texts: m(**tok(texts,
      padding=True, return_tensors="pt"))``;
    * a torch ``Dataset`` (batches stacked with ``default_collate``);
    * a torch ``DataLoader``, whose batches are used as they come (its own batch size and
      ``collate_fn``; ``batch_size`` is not used); results follow its order, so pass one
      with ``shuffle=False``. :meth:`fit` reads its first batch.

    The model must return logits: :meth:`fit` warns when its outputs look like
    probabilities (log-probabilities are fine). Examples whose logits or PEF norms are
    NaN or infinite stop :meth:`compute` with an error that names them.

    Examples
    --------
    >>> import torch
    >>> from sknpeff import PEFTransformer
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3)).eval()
    >>> X = torch.randn(10, 4)
    >>> pef = PEFTransformer(model, kind="low_rank", n_values=16).fit(X)
    >>> res = pef.compute(X)
    >>> res.pefs.shape, res.norms.shape
    ((10, 201), (10,))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str = "diagonal",
        n_values: int = 65536,
        n_classes: int | None = None,
        class_axis: str = "top",
        min_class_prob: float | None = None,
        random_state: Any = None,
        output: str = "auto",
        normalize: bool = True,
        min_norm: float | None = None,
        params: Sequence[str] | Callable[[str, nn.Parameter], bool] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        position: Any = None,
        batch_size: int = 32,
        n_jobs: int | str | None = "auto",
        device: str | torch.device | None = None,
        dtype: str = "float32",
        allow_train_mode: bool = False,
        verbose: int = 0,
        compression: str = "topk",
        projection_seed: int = 0,
    ):
        self.model = model
        self.kind = kind
        self.n_values = n_values
        self.n_classes = n_classes
        self.class_axis = class_axis
        self.min_class_prob = min_class_prob
        self.random_state = random_state
        self.output = output
        self.normalize = normalize
        self.min_norm = min_norm
        self.params = params
        self.forward = forward
        self.position = position
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.device = device
        self.dtype = dtype
        self.allow_train_mode = allow_train_mode
        self.verbose = verbose
        self.compression = compression
        self.projection_seed = projection_seed

    # -- validation ----------------------------------------------------------------------------
    def _validate(self):
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(self.model).__name__}.")
        check_choice(self.kind, "kind", ("diagonal", "low_rank"))
        check_int(self.n_values, "n_values", low=1)
        check_int(self.n_classes, "n_classes", low=1, allow_none=True)
        check_choice(self.class_axis, "class_axis", CLASS_AXES)
        check_float(self.min_class_prob, "min_class_prob", low=0.0, high=1.0, allow_none=True)
        if self.min_class_prob is not None and self.class_axis != "top":
            raise InvalidParameterError(
                f"min_class_prob drops classes of class_axis='top'; got "
                f"class_axis={self.class_axis!r}: leave min_class_prob=None.")
        check_choice(self.output, "output", ("auto", *OUTPUTS))
        check_float(self.min_norm, "min_norm", low=0.0, allow_none=True)
        check_choice(self.compression, "compression", ("topk", "projection"))
        check_int(self.projection_seed, "projection_seed", low=0)
        if self.compression == "projection" and self.kind != "low_rank":
            raise InvalidParameterError(
                "compression='projection' needs kind='low_rank': a projected diagonal PEF "
                "R f is signed, which the non-negative D-NPEFF factorization cannot use.")
        check_int(self.batch_size, "batch_size", low=1)
        if self.n_jobs not in (-1, "auto"):
            try:
                check_int(self.n_jobs, "n_jobs", low=1, allow_none=True)
            except InvalidParameterError:
                raise InvalidParameterError(
                    f"n_jobs must be None, 'auto', -1 or an integer >= 1; got {self.n_jobs!r}."
                ) from None
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}.") from exc
        if dt not in (np.float32, np.float64):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}.")
        if self.forward is not None and not callable(self.forward):
            raise ValueError("forward must be None or a callable forward(model, batch).")
        check_position(self.position)
        check_int(int(self.verbose) if isinstance(self.verbose, bool) else self.verbose,
                  "verbose")
        check_eval_mode(self.model, "makes PEFs random",
                        allow_train_mode=self.allow_train_mode, allow_param="allow_train_mode")
        params = list(self.model.parameters())
        if not params:
            raise ValueError("model has no parameters.")
        if self.device is not None:
            dev = torch.device(self.device)
            pdev = params[0].device
            if dev.type != pdev.type or (dev.index is not None and dev.index != pdev.index):
                raise ValueError(
                    f"device={self.device!r} but the model's parameters live on {pdev}; move "
                    "the model there (model.to(device)) or leave device=None."
                )

    def _engine_key(self) -> tuple:
        # what the per-layer plan and its one-batch check depend on
        return (id(self.model), id(self.forward), self._position_key(), repr(self.params),
                self.kind, self.n_classes_, self.output_, self.layout_, self.class_axis)

    def _engine(self, learned: tuple | None = None):
        """A new engine; ``learned`` (from :meth:`_learned`) spares it the first-batch
        check. By default, what an earlier call on the same model learned is used."""
        eng = Engine(self, self.layout_, self.n_classes_)
        eng.forward = self._forward_fn()
        if learned is None:
            memo = getattr(self, "_engine_memo", None)
            if memo is not None and memo[0] == self._engine_key():
                learned = memo[1]
        if learned is not None:
            # reuse what a verified engine learned (which parameters need the generic
            # path, the one-batch check, the selection's statistics)
            fallback, no_expand, select_state = learned
            eng.fallback |= fallback
            eng._refresh_hooked()
            eng.no_expand = set(no_expand)
            eng.select_state = dict(select_state)
            eng.verified = True
        return eng

    def _position_key(self):
        pos = check_position(self.position)
        return ("array", id(self.position)) if isinstance(pos, np.ndarray) else pos

    def _forward_fn(self):
        """The forward the engine calls: the user's (or the default), then the pick of
        the explained position."""
        return PositionForward(self.forward, check_position(self.position))

    def _batches(self, X, batches):
        """``batches`` of ``X`` with their slice of an array ``position`` attached."""
        pos = check_position(self.position)
        if not isinstance(pos, np.ndarray):
            return batches
        n = n_examples(X)
        if n is not None and n != pos.shape[0]:
            raise ValueError(
                f"position holds {pos.shape[0]} positions but X has {n} examples: give "
                "one position per example of X (or a position column of dict batches).")
        return attach_positions(batches, pos)

    @staticmethod
    def _learned(eng: Engine) -> tuple:
        return set(eng.fallback), set(eng.no_expand), dict(eng.select_state)

    def _remember(self, eng: Engine) -> None:
        if eng.verified:
            self._engine_memo = (self._engine_key(), self._learned(eng))

    def _n_jobs_for(self, eng: Engine) -> int:
        """Concurrent batches for this engine: 1 on a GPU or with generic-path
        parameters (``torch.func.functional_call`` swaps the model's parameters)."""
        if self.n_jobs is None or eng.device.type != "cpu" or eng.fallback:
            return 1
        if self.n_jobs == "auto":
            return min(torch.get_num_threads(), AUTO_MAX_JOBS)
        return torch.get_num_threads() if self.n_jobs == -1 else int(self.n_jobs)

    def _run_batches(self, eng: Engine, batches: Iterable) -> Iterator[tuple]:
        """``eng.run_batch`` of every batch, in order, on ``n_jobs`` threads when asked
        for; an engine that has not verified the per-layer rules yet does so on the
        first batch alone (the check may move parameters to the generic path)."""
        it = iter(batches)
        if not eng.verified:
            first = next(it, None)
            if first is None:
                return
            yield eng.run_batch(*first)
        n_jobs = self._n_jobs_for(eng)
        if n_jobs == 1:
            for batch in it:
                yield eng.run_batch(*batch)
            return
        yield from self._run_threaded(eng, it, n_jobs)

    def _run_threaded(self, eng: Engine, it: Iterator, n_jobs: int) -> Iterator[tuple]:
        learned = self._learned(eng)
        engines = [eng] + [self._engine(learned) for _ in range(n_jobs - 1)]
        free: queue.SimpleQueue = queue.SimpleQueue()
        for e in engines:
            free.put(e)

        def task(batch):
            e = free.get()  # at most n_jobs tasks run: one engine is always free
            try:
                return e.run_batch(*batch)
            finally:
                free.put(e)

        pending: deque = deque()  # (future, batch), in order
        redo: list = []
        pool = ThreadPoolExecutor(n_jobs, thread_name_prefix="sknpeff-pef")
        # each job gets an equal share of torch's intra-op threads (restored on exit)
        with limit_threads(max(1, torch.get_num_threads() // n_jobs), blas_threads=False):
            try:
                for e in engines:
                    e.shared = True
                for e in engines[1:]:
                    e.add_hooks()
                exhausted = False
                while True:
                    # bounded look-ahead (bounded memory): at most 2 * n_jobs batches pending
                    while not exhausted and len(pending) < 2 * n_jobs:
                        batch = next(it, _END)
                        exhausted = batch is _END
                        if not exhausted:
                            pending.append((pool.submit(task, batch), batch))
                    if not pending:
                        break
                    fut, batch = pending.popleft()
                    try:
                        res = fut.result()
                    except NeedsOneThread:
                        # a later batch needs the generic path: this one and every later
                        # one are run again on this thread, whose engine moves the
                        # parameters
                        redo = [batch, *(b for _, b in pending)]
                        break
                    yield res
            finally:
                # on an error, an interrupt or an early close: drop what has not started,
                # let the running batches end, then undo everything
                pool.shutdown(wait=True, cancel_futures=True)
                for e in engines:
                    e.shared = False
                for e in engines[1:]:
                    e.remove_hooks()
        for batch in itertools.chain(redo, it):
            yield eng.run_batch(*batch)

    # -- sklearn API ---------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Record the parameter layout and the number of classes.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples (forms in the Notes of :class:`PEFTransformer`); one small batch (a
            DataLoader's first batch) is run through the model to read its number of
            outputs.
        y : ignored

        Returns
        -------
        self : PEFTransformer
        """
        self._validate()
        self._engine_memo = None
        layout = ParameterLayout.from_model(self.model, self.params)
        pad = self.position is not None  # token ids of different lengths are padded
        batch = next(iter(self._batches(X, [first_batch(X, self.batch_size, pad_ids=pad)])))
        p0 = next(self.model.parameters())
        with torch.no_grad():
            logits = as_logits(self._forward_fn()(self.model,
                                                  to_device(batch, p0.device, p0.dtype)))
        check_logits(logits)
        check_not_probabilities(logits)
        n_out = int(logits.shape[1])
        self.layout_ = layout
        self.n_params_ = layout.n_params
        output = resolve_output(self.output, n_out)
        if output == "sigmoid" and self.min_class_prob is not None:
            raise InvalidParameterError(
                "min_class_prob applies to softmax outputs; with sigmoid outputs (one "
                "logit, or output='sigmoid') keep the most informative logits with "
                "n_classes instead.")
        self.output_ = output
        self.n_outputs_ = n_out
        self.n_classes_ = n_class_slots(self.class_axis, self.n_classes, n_out, output)
        self.n_features_out_ = (
            self.n_classes_ * self.n_params_ if self.kind == "low_rank" else self.n_params_
        )
        self.projection_ = None
        if self.compression == "projection":
            if self.n_values > self.n_params_:
                raise InvalidParameterError(
                    f"n_values={self.n_values} (the projected dimension) must be at most "
                    f"the number of selected parameters ({self.n_params_}).")
            self.projection_ = Projection.for_layout(layout, self.n_values,
                                                     self.projection_seed)
            self.n_features_out_ = self.n_classes_ * self.projection_.n_components
        if isinstance(X, (np.ndarray, torch.Tensor)) and X.ndim == 2:
            self.n_features_in_ = int(X.shape[1])
        return self

    def partial_fit(self, X, y=None):
        """Like :meth:`fit` on the first call; later calls only check consistency.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples (forms in the Notes of :class:`PEFTransformer`).
        y : ignored

        Returns
        -------
        self : PEFTransformer
        """
        if not hasattr(self, "layout_"):
            return self.fit(X, y)
        self._validate()
        if ParameterLayout.from_model(self.model, self.params) != self.layout_:
            raise ValueError("the model's parameter layout changed since the first fit.")
        return self

    def iter_compute(self, X) -> Iterator[PEFResult]:
        """Compute PEFs batch by batch (one :class:`PEFResult` per batch of ``X``).

        Memory stays bounded by ``batch_size`` whatever the number of examples; pair
        it with :class:`sknpeff.io.PEFWriter` to stream PEFs to disk.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples (forms in the Notes of :class:`PEFTransformer`).

        Yields
        ------
        result : PEFResult
            The PEFs of one batch.

        Raises
        ------
        ValueError
            At the first batch with examples whose logits or PEF norms are NaN or
            infinite: it names them and says whether their inputs hold NaN or infinity.
        """
        check_is_fitted(self, "layout_")
        self._validate()
        if ParameterLayout.from_model(self.model, self.params) != self.layout_:
            raise ValueError("the model's parameter layout changed since fit.")
        n = n_examples(X)
        random_axis = self.class_axis in ("sample", "project")
        # one seed per computation, read by every engine of it
        self._class_seed = (int(check_random_state(self.random_state).randint(2**31 - 1))
                            if random_axis else None)
        eng = self._engine()
        selected = eng.params
        saved_rg = [p.requires_grad for p in selected]
        progress = tqdm(total=n, desc=f"PEFs ({self.kind})", unit="ex",
                        disable=not self.verbose)
        n_zero = n_floored = start = 0
        floor = self.min_norm
        batches = iter_batches(X, self.batch_size, pad_ids=self.position is not None)
        results = self._run_batches(eng, _numbered(self._batches(X, batches), random_axis))
        try:
            for p in selected:
                p.requires_grad_(True)
            eng.add_hooks()
            for counts, idx, data, norms, logits in results:
                B = data.shape[0] if counts is None else counts.shape[0]
                check_finite(X, start, logits, norms)
                start += B
                n_zero += int((norms <= 0).sum())
                if floor is not None:
                    n_floored += int(((norms > 0) & (norms < floor)).sum())
                if counts is None:  # projected: dense rows
                    pefs = data
                else:
                    indptr = np.zeros(B + 1, dtype=np.int64)
                    np.cumsum(counts, out=indptr[1:])
                    pefs = csr_from_parts(data, idx, indptr, (B, self.n_features_out_),
                                          index_dtype="auto")
                yield PEFResult(
                    pefs=tag_pef_matrix(pefs, self.kind, self.n_classes_, self._projection()),
                    norms=norms.astype(np.float64),
                    logits=logits.astype(self.dtype),
                    predictions=predictions(logits, self.output_),
                    metadata=self._metadata(),
                )
                progress.update(B)
        finally:
            results.close()  # worker threads end before the model is restored
            eng.remove_hooks()
            for p, rg in zip(selected, saved_rg, strict=True):
                p.requires_grad_(rg)
            progress.close()
            self._remember(eng)
        if n_zero:
            warnings.warn(
                f"{n_zero} example(s) have a zero PEF (zero Frobenius norm); they are kept "
                "as empty rows.",
                stacklevel=user_stacklevel(),
            )
        if n_floored:
            warnings.warn(
                f"{n_floored} example(s) have a PEF norm below min_norm={floor!r}; they are "
                "stored as empty rows.",
                stacklevel=user_stacklevel(),
            )

    def compute(self, X, out: str | None = None, *, overwrite: bool = False) -> PEFResult:
        """PEFs, their norms, the logits and the predictions in one pass.

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples (forms in the Notes of :class:`PEFTransformer`).
        out : str or path, default=None
            If given, stream the results to this directory (see :mod:`sknpeff.io`)
            instead of holding them in memory, and return them memory-mapped. The store
            is marked complete only when every example is written: after an error or
            Ctrl-C it holds the batches written so far and loads only with
            ``load_pefs(out, allow_incomplete=True)``.
        overwrite : bool, default=False
            Replace an existing PEF store at ``out`` (a directory holding anything else
            is never replaced).

        Returns
        -------
        result : PEFResult
            With attributes ``pefs``, ``norms``, ``logits`` and ``predictions``.

        Raises
        ------
        ValueError
            For examples whose logits or PEF norms are NaN or infinite (see
            :meth:`iter_compute`).
        """
        if not hasattr(self, "layout_"):
            check_is_fitted(self, "layout_")
        if out is not None:
            from ..io import PEFWriter, load_pefs

            with PEFWriter(out, n_cols=self.n_features_out_, kind=self.kind,
                           layout=self.layout_, n_classes=self.n_classes_,
                           dtype=self.dtype, metadata={"output": self.output_,
                                                       "class_axis": self.class_axis},
                           overwrite=overwrite, projection=self._projection()) as w:
                for res in self.iter_compute(X):
                    w.append(res)
            return load_pefs(out)
        parts = list(self.iter_compute(X))
        res = concat_results(parts, self.n_features_out_, self.dtype, self.n_outputs_)
        res.metadata = self._metadata()
        res.pefs = tag_pef_matrix(res.pefs, self.kind, self.n_classes_, self._projection())
        return res

    def _projection(self) -> dict | None:
        proj = getattr(self, "projection_", None)
        return None if proj is None else proj.description()

    def _metadata(self) -> dict:
        return {"kind": self.kind, "n_classes": self.n_classes_, "output": self.output_,
                "class_axis": self.class_axis, "layout": self.layout_,
                "projection": self._projection()}

    def transform(self, X):
        """Sparse PEF matrix of ``X`` (the layout is described in the class docstring).

        Parameters
        ----------
        X : tensor, array, dict or tuple of arrays, list, Dataset or DataLoader
            Examples (forms in the Notes of :class:`PEFTransformer`).

        Returns
        -------
        pefs : scipy.sparse.csr_matrix of shape (n_examples, n_features_out)
            A dense float array with ``compression="projection"``.
        """
        return self.compute(X).pefs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.non_deterministic = False
        tags.requires_fit = True
        return tags


def _numbered(batches: Iterable, count: bool) -> Iterator[tuple[Any, int]]:
    """``(batch, start)``: each batch with the index of its first example in the data
    (counted only when ``count``; 0 otherwise)."""
    start = 0
    for batch in batches:
        yield batch, start
        if count:
            start += batch_length(
                batch, "class_axis='sample' or 'project' numbers the examples to seed "
                "their draws")
