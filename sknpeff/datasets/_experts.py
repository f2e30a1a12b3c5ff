"""Gated experts: a classifier whose sub-computations are known by construction."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import nn

from ..utils import InvalidParameterError, check_float, check_int
from ._random import torch_seed

__all__ = ["GatedExperts", "make_gated_experts"]


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

    The module ``gated_hidden`` (an identity without parameters) receives the experts'
    hidden activations times their bits, concatenated (``(batch, n_experts * hidden)``):
    the representation the experts' output layers read, for activation-based baselines
    such as :class:`~sknpeff.baselines.ActivationKMeans` (``layer="gated_hidden"``).

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
        self.gated_hidden = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of inputs.

        Parameters
        ----------
        x : torch.Tensor of shape (batch, n_experts + n_noise)
            Concept bits followed by noise features.

        Returns
        -------
        logits : torch.Tensor of shape (batch, n_classes)
        """
        out = self.base(x)
        hidden = []
        for e, expert in enumerate(self.experts):
            h = expert[1](expert[0](x))  # expert[2](h) is expert(x), the same operations
            hidden.append(h * x[:, e : e + 1])
            out = out + x[:, e : e + 1] * expert[2](h)
        # the representation the output layers read, for forward hooks (not used below)
        self.gated_hidden(torch.cat(hidden, dim=1))
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
    concepts_per_example: tuple[int, int] | None = None,
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
        Probability that a concept bit is on (bits are independent). Not used with
        ``concepts_per_example``.
    expert_scale : float, default=2.0
        Standard deviation scale of the experts' output weights (larger makes the experts
        dominate the prediction).
    base_scale : float, default=0.5
        Standard deviation scale of the shared base's parameters.
    shared_linear : bool, default=False
        Use a shared linear layer of all inputs as the base instead of a shared bias (see
        :class:`GatedExperts`); its parameters then carry much of every example's Fisher.
    concepts_per_example : (int, int), default=None
        ``(low, high)``: each example carries a number of concepts drawn uniformly from
        ``low, ..., high``, the concepts themselves uniformly without replacement (so
        ``(1, 3)`` gives examples made of one to three factors, none of none).
        ``None``: independent bits with probability ``concept_prob``.
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
    n_experts = check_int(n_experts, "n_experts", low=1)
    n_noise = check_int(n_noise, "n_noise", low=0)
    n_classes = check_int(n_classes, "n_classes", low=2)
    hidden = check_int(hidden, "hidden", low=1)
    concept_prob = check_float(concept_prob, "concept_prob", low=0.0, high=1.0, strict=True)
    expert_scale = check_float(expert_scale, "expert_scale", low=0.0)
    base_scale = check_float(base_scale, "base_scale", low=0.0)
    if concepts_per_example is not None:
        try:
            low, high = concepts_per_example
        except (TypeError, ValueError):
            raise InvalidParameterError(
                "concepts_per_example must be None or a pair (low, high) of integers; got "
                f"{concepts_per_example!r}.") from None
        low = check_int(low, "concepts_per_example[0]", low=0, high=n_experts)
        high = check_int(high, "concepts_per_example[1]", low=low, high=n_experts)
    seed = torch_seed(random_state)
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
        n_samples = check_int(n_samples, "n_samples", low=1)
        rng = check_random_state(random_state)
        if concepts_per_example is None:
            concepts = (rng.random_sample((n_samples, n_experts)) < concept_prob)
        else:
            counts = rng.randint(low, high + 1, size=n_samples)
            # the `count` smallest of uniform keys: a uniform subset of that size
            ranks = np.argsort(np.argsort(rng.random_sample((n_samples, n_experts)), axis=1),
                               axis=1)
            concepts = ranks < counts[:, None]
        concepts = concepts.astype(np.int64)
        noise = rng.standard_normal((n_samples, n_noise))
        X = np.hstack([concepts, noise]).astype(np.float32)
        return torch.from_numpy(X), concepts

    return model, sample, expert_params
