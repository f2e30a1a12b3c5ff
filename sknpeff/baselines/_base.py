"""What every baseline shares: the model's checks, its batches and a layer's activations.

The baselines read examples in the same forms as :class:`~sknpeff.pef.PEFTransformer`
(tensors, arrays, dicts, tuples of columns, lists, Datasets, DataLoaders) through the
same batching helpers, so a baseline can be fitted on whatever NPEFF was fitted on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import validate_data
from torch import nn

from ..pef._inputs import default_forward, iter_batches, n_examples, to_device
from ..utils import check_eval_mode, check_int

__all__ = [
    "ModelBaselineMixin",
    "POOLS",
    "is_array_like",
    "iter_layer_activations",
    "layer_output_tensor",
    "pool_positions",
]

POOLS = ("mean", "max", "last")


def is_array_like(X) -> bool:
    """Whether ``X`` is a numeric array (NumPy, SciPy sparse, or anything with
    ``__array__`` that is not a tensor or another supported container); arrays of
    strings are texts, not numbers."""
    if sp.issparse(X):
        return True
    if isinstance(X, np.ndarray):
        return X.dtype.kind not in "US"
    if isinstance(X, (torch.Tensor, Mapping, tuple, list, str, torch.utils.data.Dataset,
                      torch.utils.data.DataLoader)):
        return False
    return hasattr(X, "__array__")


def pool_positions(a: torch.Tensor, pool: str) -> torch.Tensor:
    """``(batch, ..., features)`` activations pooled to ``(batch, features)``.

    Every axis between the first (examples) and the last (features) is a position axis
    (tokens of a sequence, cells of a channels-last feature map): ``pool`` takes its
    ``"mean"`` or ``"max"``, or the ``"last"`` position (that of a causal model's
    next-token prediction). Two-dimensional activations come back as they are.
    """
    if a.ndim == 2:
        return a
    if a.ndim < 2:
        raise ValueError(
            "a layer's activations must have shape (batch, features) or (batch, positions, "
            f"..., features); got shape {tuple(a.shape)}."
        )
    flat = a.reshape(a.shape[0], -1, a.shape[-1])
    if pool == "last":
        return flat[:, -1]
    return flat.mean(dim=1) if pool == "mean" else flat.amax(dim=1)


def layer_output_tensor(out, name: str = "") -> torch.Tensor:
    """The activations tensor of a module's output: the tensor itself, a model output's
    ``last_hidden_state``, or the first tensor of a tuple, list or dict (an LSTM's
    ``(output, (h, c))``, a transformer layer's ``(hidden, attention)``)."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    items = out.values() if isinstance(out, Mapping) else out
    if isinstance(items, (tuple, list)) or isinstance(out, Mapping):
        for v in items:
            if isinstance(v, torch.Tensor):
                return v
    raise ValueError(
        f"layer {name!r} returned {type(out).__name__}, which holds no activations tensor; "
        "name a module that returns a tensor."
    )


def iter_layer_activations(model: nn.Module, X, layers: Sequence[str], *,
                           forward: Callable | None, batch_size: int,
                           device: torch.device) -> Iterator[list[torch.Tensor]]:
    """For each batch of ``X``, the outputs of the modules named ``layers`` (detached).

    Forward hooks record the outputs; they are removed afterwards whatever happens. A
    module called several times in one forward pass is refused (which call to use would
    be a guess).
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        listed = ", ".join(repr(n) for n in list(modules)[:12])
        raise ValueError(
            f"layer {missing[0]!r} is not a module of the model; its modules are named "
            f"{listed}{', ...' if len(modules) > 12 else ''} (see model.named_modules())."
        )
    fwd = forward if forward is not None else default_forward
    dtype = next(model.parameters()).dtype
    seen: dict[str, list] = {name: [] for name in layers}

    def hook_for(name):
        def hook(module, args, out):
            seen[name].append(layer_output_tensor(out, name).detach())
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        for batch in iter_batches(X, batch_size):
            for v in seen.values():
                v.clear()
            with torch.no_grad():
                fwd(model, to_device(batch, device, dtype))
            outs = []
            for name in layers:
                if len(seen[name]) != 1:
                    raise ValueError(
                        f"layer {name!r} ran {len(seen[name])} times in one forward pass; "
                        "name a module that runs exactly once per batch."
                    )
                outs.append(seen[name][0])
            yield outs
    finally:
        for h in handles:
            h.remove()


class ModelBaselineMixin:
    """Checks and helpers of an estimator built on a torch model (``model``, ``forward``,
    ``batch_size``, ``device``)."""

    def __sklearn_tags__(self):
        # inputs holding NaN are refused (scikit-learn checks that they are)
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    def _check_model(self) -> torch.device:
        """Validate the model-related parameters; return the device to compute on."""
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(self.model).__name__}.")
        if self.forward is not None and not callable(self.forward):
            raise ValueError("forward must be None or a callable forward(model, batch).")
        check_int(self.batch_size, "batch_size", low=1)
        check_eval_mode(self.model, "makes the baseline's features random")
        params = list(self.model.parameters())
        if not params:
            raise ValueError("model has no parameters.")
        pdev = params[0].device
        if self.device is not None:
            dev = torch.device(self.device)
            if dev.type != pdev.type or (dev.index is not None and dev.index != pdev.index):
                raise ValueError(
                    f"device={self.device!r} but the model's parameters live on {pdev}; move "
                    "the model there (model.to(device)) or leave device=None."
                )
        return pdev

    def _check_examples(self, X, *, reset: bool) -> Any:
        """``X`` in a readable form, with at least one example; records (``reset``) or
        checks the number of input features of two-dimensional arrays."""
        if is_array_like(X):
            # numeric arrays get scikit-learn's checks (dtype, NaN/inf, sparse, shape)
            return validate_data(self, X, reset=reset, accept_sparse=False, allow_nd=True,
                                 dtype="numeric")
        n = n_examples(X)
        if n == 0:
            raise ValueError("X holds no example (0 samples).")
        if isinstance(X, torch.Tensor) and X.ndim == 2:
            if reset:
                self.n_features_in_ = int(X.shape[1])
            elif hasattr(self, "n_features_in_") and X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
        elif reset and hasattr(self, "n_features_in_"):
            del self.n_features_in_
        return X

    @staticmethod
    def _check_finite(Z: np.ndarray, what: str) -> None:
        bad = ~np.isfinite(Z).all(axis=1)
        if bad.any():
            idx = np.flatnonzero(bad)
            raise ValueError(
                f"{what} of {idx.size} example(s) contain NaN or inf (first: "
                f"{idx[:8].tolist()}); check the inputs."
            )
