"""In-context learning: a tiny causal transformer and a task with known mechanisms.

Each sequence lists ``n_pairs`` key-value pairs, then a marker and a query key; the
model predicts the next token, a value. Which mechanism an example needs is known by
construction:

* ``"recall"`` (marker ``Q``, a key of the context): copy the value paired with the
  query key earlier in the sequence (in-context recall, an induction-style lookup);
  the pairing is random per sequence, so the weights cannot hold it;
* ``"memorized"`` (marker ``Q``, one of the memorized keys, never in the context): a
  fixed key-to-value table, the same for every sequence, stored in the weights;
* ``"mixed"`` (marker ``F``, a key of the context): recall the paired value, then map
  it through a fixed permutation of the values: both mechanisms.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.utils import Bunch, check_random_state
from torch import nn

from ..utils import check_float, check_int, limit_threads
from ._random import torch_seed

__all__ = ["MECHANISMS", "TinyCausalLM", "icl_vocabulary", "make_icl_task", "train_icl_model"]

#: the mechanisms of :func:`make_icl_task`, in label order
MECHANISMS = ("recall", "memorized", "mixed")


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then an MLP."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_mlp)
        self.out = nn.Linear(d_mlp, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        H = self.n_heads
        q, k, v = self.qkv(self.ln1(h)).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return h + self.out(torch.relu(self.fc(self.ln2(h))))


class TinyCausalLM(nn.Module):
    """A small GPT-style causal language model made of standard torch layers.

    Token and learned position embeddings, ``n_layers`` pre-norm blocks (causal
    self-attention, ReLU MLP), a final layer norm and an unembedding. Every parameter
    belongs to an ``nn.Embedding``, ``nn.Linear`` or ``nn.LayerNorm``, so its per-example
    Fishers take the fast per-layer path.

    Parameters
    ----------
    vocab_size : int
        Number of tokens.
    n_positions : int
        Longest sequence.
    d_model : int, default=48
        Width of the residual stream.
    n_layers : int, default=2
        Number of blocks (in-context recall needs two).
    n_heads : int, default=2
        Attention heads per block (must divide ``d_model``).
    d_mlp : int, default=96
        Hidden width of the MLPs.

    Examples
    --------
    >>> import torch
    >>> from sknpeff.datasets import TinyCausalLM
    >>> TinyCausalLM(10, 6)(torch.zeros(2, 6, dtype=torch.long)).shape
    torch.Size([2, 6, 10])
    """

    def __init__(self, vocab_size: int, n_positions: int, d_model: int = 48,
                 n_layers: int = 2, n_heads: int = 2, d_mlp: int = 96) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}.")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(n_positions, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of every position.

        Parameters
        ----------
        input_ids : torch.Tensor of shape (batch, seq_len)

        Returns
        -------
        logits : torch.Tensor of shape (batch, seq_len, vocab_size)
        """
        T = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device)[None])
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.ln_f(h))


def icl_vocabulary(n_keys: int = 8, n_values: int = 8) -> list[str]:
    """The token strings of :func:`make_icl_task`'s vocabulary, by id.

    Context keys ``k0 ...``, memorized keys ``m0 ...``, values ``v0 ...``, then the
    markers ``Q`` (look up the query key) and ``F`` (look it up, then map the value).

    Parameters
    ----------
    n_keys, n_values : int, default=8
        As in :func:`make_icl_task`.

    Returns
    -------
    tokens : list of str
    """
    return ([f"k{i}" for i in range(n_keys)] + [f"m{i}" for i in range(n_keys)]
            + [f"v{i}" for i in range(n_values)] + ["Q", "F"])


def _tables(n_keys: int, n_values: int, table_seed: int):
    rng = np.random.RandomState(table_seed)
    return rng.randint(0, n_values, n_keys), rng.permutation(n_values)


def make_icl_task(n_samples: int, *, mechanisms=MECHANISMS, n_pairs: int = 3,
                  n_keys: int = 8, n_values: int = 8, table_seed: int = 0,
                  random_state=None) -> Bunch:
    """Sequences of an in-context task whose mechanism per example is known.

    A sequence is ``k_1 v_1 ... k_P v_P M q``: ``P`` pairs of distinct context keys and
    random values, a marker ``M`` and a query key ``q``; the answer is the next token.
    Mechanisms (equal shares, in turn): ``"recall"`` (``M = Q``, ``q`` one of the
    context keys: its value), ``"memorized"`` (``M = Q``, ``q`` a memorized key, never
    in the context: a fixed table's value), ``"mixed"`` (``M = F``, ``q`` a context key:
    the fixed permutation of its value). The tables depend on ``table_seed`` only, so
    training and held-out sequences share them.

    Parameters
    ----------
    n_samples : int
        Number of sequences.
    mechanisms : sequence of str, default=("recall", "memorized", "mixed")
        Mechanisms to draw from (cycled over the examples).
    n_pairs : int, default=3
        Key-value pairs per context.
    n_keys : int, default=8
        Context keys, and memorized keys (as many).
    n_values : int, default=8
        Values.
    table_seed : int, default=0
        Seed of the memorized table and of the permutation.
    random_state : int, RandomState instance or None, default=None
        Seed of the sequences.

    Returns
    -------
    task : sklearn.utils.Bunch
        ``input_ids`` (int64 tensor ``(n_samples, 2 * n_pairs + 2)``), ``answer``
        (int64 ndarray, token ids), ``mechanism`` (str ndarray), ``label`` (int ndarray,
        index in :data:`MECHANISMS`), ``needs_context`` and ``needs_weights`` (bool
        ndarrays: whether the answer needs the context, the memorized tables), ``tokens``
        (the vocabulary, :func:`icl_vocabulary`).

    Examples
    --------
    >>> from sknpeff.datasets import make_icl_task
    >>> task = make_icl_task(3, random_state=0)
    >>> [" ".join(task.tokens[t] for t in seq) for seq in task.input_ids.tolist()]
    ['k4 v6 k6 v7 k3 v0 Q k3', 'k6 v1 k7 v1 k1 v1 Q m2', 'k0 v7 k6 v0 k2 v7 F k2']
    >>> [task.tokens[a] for a in task.answer], task.mechanism.tolist()
    (['v0', 'v5', 'v1'], ['recall', 'memorized', 'mixed'])
    """
    n_samples = check_int(n_samples, "n_samples", low=1)
    n_pairs = check_int(n_pairs, "n_pairs", low=1)
    n_keys = check_int(n_keys, "n_keys", low=n_pairs)
    n_values = check_int(n_values, "n_values", low=2)
    mechanisms = list(mechanisms)
    for m in mechanisms:
        if m not in MECHANISMS:
            raise ValueError(f"mechanisms must hold names among {MECHANISMS}; got {m!r}.")
    if not mechanisms:
        raise ValueError("mechanisms must name at least one mechanism.")
    rng = check_random_state(random_state)
    table, perm = _tables(n_keys, n_values, table_seed)
    K, M, Vo = 0, n_keys, 2 * n_keys  # first ids of context keys, memorized keys, values
    Q, F = Vo + n_values, Vo + n_values + 1
    T = 2 * n_pairs + 2
    ids = np.zeros((n_samples, T), dtype=np.int64)
    answer = np.zeros(n_samples, dtype=np.int64)
    mech = np.array([mechanisms[i % len(mechanisms)] for i in range(n_samples)])
    keys = np.argsort(rng.random_sample((n_samples, n_keys)), axis=1)[:, :n_pairs]
    vals = rng.randint(0, n_values, (n_samples, n_pairs))
    j = rng.randint(0, n_pairs, n_samples)
    memo = rng.randint(0, n_keys, n_samples)
    ids[:, 0 : 2 * n_pairs : 2] = K + keys
    ids[:, 1 : 2 * n_pairs : 2] = Vo + vals
    rows = np.arange(n_samples)
    kq, vq = keys[rows, j], vals[rows, j]
    is_mem, is_mix = mech == "memorized", mech == "mixed"
    ids[:, -2] = np.where(is_mix, F, Q)
    ids[:, -1] = np.where(is_mem, M + memo, K + kq)
    answer[:] = Vo + np.where(is_mem, table[memo], np.where(is_mix, perm[vq], vq))
    label = np.array([MECHANISMS.index(m) for m in mech])
    return Bunch(input_ids=torch.from_numpy(ids), answer=answer, mechanism=mech, label=label,
                 needs_context=mech != "memorized", needs_weights=mech != "recall",
                 tokens=icl_vocabulary(n_keys, n_values))


def train_icl_model(random_state=0, n_steps: int = 400, *, n_pairs: int = 3,
                    n_keys: int = 8, n_values: int = 8, table_seed: int = 0,
                    batch_size: int = 128, learning_rate: float = 3e-3,
                    label_smoothing: float = 0.1, d_model: int = 48,
                    n_layers: int = 2, n_heads: int = 2, n_test: int = 600,
                    verbose: int = 0) -> tuple[TinyCausalLM, Bunch]:
    """Train a :class:`TinyCausalLM` on :func:`make_icl_task` (seconds on one CPU core).

    Fresh sequences every step (all three mechanisms in equal shares), the loss on the
    answer only; Adam with a fixed seed, on one CPU thread (restored afterwards). The
    global torch RNG state is left untouched.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=0
        Seed of the initialisation and of the training sequences.
    n_steps : int, default=400
        Optimizer steps.
    n_pairs, n_keys, n_values, table_seed : int
        The task, as in :func:`make_icl_task`.
    batch_size : int, default=128
        Sequences per step.
    learning_rate : float, default=3e-3
        Adam step size (cosine decay to zero).
    label_smoothing : float, default=0.1
        Label smoothing of the loss: it keeps predictions away from certainty, whose
        Fishers vanish.
    d_model, n_layers, n_heads : int
        The model, as in :class:`TinyCausalLM`.
    n_test : int, default=600
        Held-out sequences for the reported accuracies.
    verbose : int, default=0
        If positive, print the loss every 100 steps.

    Returns
    -------
    model : TinyCausalLM
        The trained model, float32, in eval mode.
    info : sklearn.utils.Bunch
        ``accuracy`` (dict: mechanism -> held-out accuracy of the answer) and the task's
        settings (``n_pairs``, ``n_keys``, ``n_values``, ``table_seed``, ``tokens``).

    Examples
    --------
    >>> from sknpeff.datasets import train_icl_model
    >>> model, info = train_icl_model(random_state=0)  # doctest: +SKIP
    >>> min(info.accuracy.values()) > 0.95  # doctest: +SKIP
    True
    """
    n_steps = check_int(n_steps, "n_steps", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    learning_rate = check_float(learning_rate, "learning_rate", low=0.0, strict=True)
    label_smoothing = check_float(label_smoothing, "label_smoothing", low=0.0, high=0.99)
    seed = torch_seed(random_state)
    rng = np.random.RandomState(seed)
    tokens = icl_vocabulary(n_keys, n_values)
    T = 2 * n_pairs + 2
    task = dict(n_pairs=n_pairs, n_keys=n_keys, n_values=n_values, table_seed=table_seed)
    with limit_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCausalLM(len(tokens), T, d_model=d_model, n_layers=n_layers,
                             n_heads=n_heads, d_mlp=2 * d_model)
        opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / n_steps)))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        model.train()
        for step in range(n_steps):
            b = make_icl_task(batch_size, random_state=rng, **task)
            perm = rng.permutation(batch_size)  # mechanisms mixed in every step
            loss = loss_fn(model(b.input_ids[perm])[:, -1], torch.from_numpy(b.answer[perm]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if verbose and (step + 1) % 100 == 0:
                print(f"step {step + 1}: loss {loss.item():.3f}")
        model.eval()
        test = make_icl_task(n_test, random_state=rng, **task)
        with torch.no_grad():
            pred = model(test.input_ids)[:, -1].argmax(-1).numpy()
    acc = {m: float((pred == test.answer)[test.mechanism == m].mean()) for m in MECHANISMS}
    return model, Bunch(accuracy=acc, tokens=tokens, **task)
