"""Seeded random projections of per-example gradients: :class:`Projection`.

A projected PEF stores ``R a_ij`` instead of the top entries of ``a_ij``, for a fixed
random operator ``R`` of shape ``(d, n_params)``; since ``F = sum_j a_j a_j^T``, the
projected Fisher ``R F R^T = sum_j (R a_j)(R a_j)^T`` keeps the low-rank form and its
inner products (the TMLR revision of arXiv 2310.04649).

``R`` is block diagonal over the parameters and is never stored whole:

* every large weight matrix (a parameter of two or more axes and at least
  :data:`MIN_KRONECKER_SIZE` entries, seen as ``(shape[0], rest)``: ``Linear``
  ``(out, in)``, convolutions ``(out, in/groups * kernel)``, embeddings ``(vocab, dim)``)
  gets a Kronecker block ``P_out (x) P_in``, so that for a per-example gradient
  ``sum_t delta_t x_t^T`` the projection ``sum_t (P_out delta_t)(P_in x_t)^T`` costs the
  backward pass plus small products and the gradient is never formed (the idea of
  LoGra, Choe et al. 2024);
* all other parameters (small matrices, biases, norm scales, vectors) share one sparse
  sign block (sparse Johnson-Lindenstrauss: each column has ``s`` entries
  ``+-1/sqrt(s)``, one in each of ``s`` row groups).

Why not Kronecker blocks everywhere: a Kronecker block preserves lengths far less well
than an unstructured one with as many rows. For a rank-one gradient ``delta x^T`` the
relative variance of ``||R_block a||^2`` is about ``2 / d_out + 2 / d_in`` against
``2 / (d_out d_in)`` for a Gaussian or sparse sign block, and inner products between
PEFs (all a factorization sees) are distorted alike. The saving of never forming the
gradient only matters for large matrices; a small one's gradient is cheap to write, so
it goes through the sparse block, where it is measured as precisely as ``d`` allows.

Every factor has i.i.d. entries of variance ``1 / rows`` and the blocks are independent,
so ``E[R^T R] = I`` and ``E ||R x||^2 = ||x||^2``. The ``d`` rows are allotted to the
blocks in proportion to the square root of their sizes (small layers get relatively
more rows than by size, which keeps every layer's part of a vector measurable); a
large matrix whose share would be under :data:`MIN_KRONECKER_ROWS` rows joins the sparse
block too. Factors are drawn on the CPU from a generator seeded by ``(seed, block)`` in
float64, so the same seed gives the same operator on every device and dtype.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..layout import ParameterLayout
from ..utils import check_int, pef_projection

__all__ = [
    "MIN_KRONECKER_ROWS",
    "MIN_KRONECKER_SIZE",
    "KroneckerBlock",
    "Projection",
    "SparseSignBlock",
    "refuse_projected",
]

FORMAT = "sknpeff-projection"
VERSION = 1
#: smallest row count given to a Kronecker block (below, the matrix joins the sparse block)
MIN_KRONECKER_ROWS = 4
#: smallest weight matrix (entries) given a Kronecker block; smaller ones join the sparse
#: block, whose projection is more precise but needs the gradient written out (for a
#: convolution, as costly as top-K's per-example gradients: larger thresholds made
#: ResNet-18's projected PEFs slower than the backward passes justify)
MIN_KRONECKER_SIZE = 1 << 13
#: non-zeros per column of the sparse sign block (at most its row count)
SPARSE_NNZ = 8
#: columns of the sparse block drawn per generator call (fixed: part of the definition)
_SIGN_CHUNK = 1 << 20


class KroneckerBlock:
    """``P_out (x) P_in`` on one weight matrix seen as ``(n_out, n_in)``.

    ``R_block vec(W) = vec(P_out W P_in^T)`` (row-major), ``P_out`` ``(d_out, n_out)``,
    ``P_in`` ``(d_in, n_in)``; output rows ``offset : offset + d_out * d_in``.
    """

    type = "kronecker"

    def __init__(self, pid: int, offset: int, n_out: int, n_in: int, d_out: int, d_in: int):
        self.pid, self.offset = int(pid), int(offset)
        self.n_out, self.n_in, self.d_out, self.d_in = int(n_out), int(n_in), int(d_out), int(d_in)

    @property
    def dim(self) -> int:
        return self.d_out * self.d_in

    def to_dict(self, layout: ParameterLayout) -> dict:
        return {"type": self.type, "param": layout.names[self.pid], "offset": self.offset,
                "in_shape": [self.n_out, self.n_in], "dims": [self.d_out, self.d_in]}


class SparseSignBlock:
    """A sparse sign matrix on the concatenation of several parameters.

    Column ``q`` has ``nnz`` entries ``+-1/sqrt(nnz)``, one in each of ``nnz`` row groups
    (so in distinct rows); output rows ``offset : offset + dim``.
    """

    type = "sparse_sign"

    def __init__(self, pids: Sequence[int], offset: int, size: int, dim: int, nnz: int):
        self.pids, self.offset = [int(p) for p in pids], int(offset)
        self.size, self.dim, self.nnz = int(size), int(dim), int(nnz)

    def to_dict(self, layout: ParameterLayout) -> dict:
        return {"type": self.type, "params": [layout.names[p] for p in self.pids],
                "offset": self.offset, "size": self.size, "dim": self.dim,
                "nnz_per_column": self.nnz}


def refuse_projected(x, what: str = "the input") -> None:
    """Raise if ``x`` (a matrix or a :class:`~sknpeff.pef.PEFResult`) holds projected PEFs.

    Projecting projected PEFs would apply a second random operator to coordinates that
    are no longer parameters: every later step (recovery, perturbations) would be wrong
    without any visible sign.
    """
    md = getattr(x, "metadata", None)
    tagged = pef_projection(getattr(x, "pefs", x)) is not None
    if tagged or (isinstance(md, Mapping) and md.get("projection") is not None):
        raise ValueError(
            f"{what} holds PEFs that are already randomly projected (their columns are "
            "projection coordinates, not parameters); a projection applies to unprojected "
            "per-parameter vectors only.")


def _block_generator(seed: int, index: int) -> torch.Generator:
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)])
    return torch.Generator(device="cpu").manual_seed(int(s.generate_state(1, np.uint64)[0]
                                                         >> np.uint64(1)))


def _factor(t: int, n_out: int, n_in: int) -> tuple[int, int]:
    """``(d_out, d_in)`` with ``d_out * d_in <= t``, as balanced as the shape allows.

    Balanced factors keep the coherence of the block's columns low (two columns that
    share an input or an output index have inner products of order
    ``1 / sqrt(min(d_out, d_in))``), which compressed-sensing recovery needs.
    """
    d_out = int(min(n_out, t, max(1, round(math.sqrt(t)))))
    d_in = int(min(n_in, max(1, t // d_out)))
    d_out = int(min(n_out, max(1, t // d_in)))
    return d_out, d_in


def _plan(layout: ParameterLayout, d: int, min_size: int) -> list:
    shapes, sizes = layout.shapes, layout.sizes
    mats = [p for p, s in enumerate(shapes)
            if len(s) >= 2 and s[0] >= 2 and sizes[p] // s[0] >= 2 and sizes[p] >= min_size]
    while True:
        rest = [p for p in range(len(sizes)) if p not in mats]
        if not rest:  # the sparse block takes the smallest matrix
            small = min(mats, key=lambda p: (sizes[p], -p))
            mats.remove(small)
            continue
        weights = {p: math.sqrt(sizes[p]) for p in mats}
        w_rest = math.sqrt(sum(sizes[p] for p in rest))
        total = sum(weights.values()) + w_rest
        target = {p: d * w / total for p, w in weights.items()}
        tiny = [p for p in mats if target[p] < MIN_KRONECKER_ROWS]
        if not tiny:
            break
        mats = [p for p in mats if p not in tiny]
    dims = {p: _factor(int(target[p]), shapes[p][0], sizes[p] // shapes[p][0]) for p in mats}
    # the sparse block gets what is left, at least one row
    while mats and d - sum(a * b for a, b in dims.values()) < 1:
        p = max(mats, key=lambda q: dims[q][0] * dims[q][1])
        a, b = dims[p]
        dims[p] = (a - 1, b) if a >= b else (a, b - 1)
        if 0 in dims[p]:
            mats.remove(p)
            del dims[p]
    blocks: list = []
    off = 0
    for p in sorted(mats):
        blocks.append(KroneckerBlock(p, off, shapes[p][0], sizes[p] // shapes[p][0], *dims[p]))
        off += blocks[-1].dim
    rest = [p for p in range(len(sizes)) if p not in mats]
    dim = d - off
    blocks.append(SparseSignBlock(rest, off, sum(sizes[p] for p in rest), dim,
                                  min(SPARSE_NNZ, dim)))
    return blocks


class Projection:
    """A seeded random projection ``R`` (``n_components x n_params``), never stored whole.

    Built for a parameter layout with :meth:`for_layout`; rebuilt exactly from its
    :meth:`description` (a JSON-serialisable dict that travels with projected PEFs)
    with :meth:`from_description`. :meth:`apply` computes ``R x``, :meth:`adjoint`
    ``R^T y``. Block structure and scaling: see :mod:`sknpeff.pef._projection`.

    Parameters
    ----------
    layout : ParameterLayout
        The parameters (flat order) the operator acts on.
    blocks : list of KroneckerBlock and SparseSignBlock
        The block structure (from :meth:`for_layout` or a description).
    seed : int
        Seed of every random factor.

    Attributes
    ----------
    n_components : int
        Number of rows ``d``.
    n_params : int
        Number of columns (the layout's flat size).

    Examples
    --------
    >>> import torch
    >>> from sknpeff.layout import ParameterLayout
    >>> from sknpeff.pef import Projection
    >>> model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 4))
    >>> R = Projection.for_layout(ParameterLayout.from_model(model), 64, seed=0)
    >>> R.n_components, R.n_params
    (64, 754)
    >>> x, y = torch.randn(754, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    >>> bool(torch.isclose(R.apply(x) @ y, x @ R.adjoint(y)))
    True
    """

    def __init__(self, layout: ParameterLayout, blocks: Sequence, seed: int):
        self.layout = layout
        self.blocks = list(blocks)
        self.seed = int(seed)
        self.n_params = layout.n_params
        self.n_components = int(sum(b.dim for b in self.blocks))
        self._cache: dict = {}
        self._lock = threading.Lock()
        self.block_of: dict[int, KroneckerBlock] = {
            b.pid: b for b in self.blocks if isinstance(b, KroneckerBlock)}
        sparse = [b for b in self.blocks if isinstance(b, SparseSignBlock)]
        self.sparse: SparseSignBlock | None = sparse[0] if sparse else None
        # each sparse-block parameter's column offset inside that block
        self.sparse_offset: dict[int, int] = {}
        if self.sparse is not None:
            o = 0
            for p in self.sparse.pids:
                self.sparse_offset[p] = o
                o += layout.sizes[p]

    # -- construction -------------------------------------------------------------------
    @classmethod
    def for_layout(cls, layout: ParameterLayout, n_components: int, seed: int = 0, *,
                   min_kronecker_size: int | None = None) -> Projection:
        """The projection of ``layout`` onto ``n_components`` rows, drawn from ``seed``.

        Parameters
        ----------
        layout : ParameterLayout
        n_components : int
            Number of rows ``d``, at least 1.
        seed : int, default=0
        min_kronecker_size : int, default=None
            Smallest weight matrix (in entries) given a Kronecker block (``0``: every
            matrix); smaller parameters share the sparse sign block. ``None``:
            :data:`MIN_KRONECKER_SIZE`.

        Returns
        -------
        projection : Projection
        """
        n_components = int(n_components)
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1; got {n_components}.")
        if min_kronecker_size is None:
            min_kronecker_size = MIN_KRONECKER_SIZE
        min_kronecker_size = check_int(min_kronecker_size, "min_kronecker_size", low=0)
        return cls(layout, _plan(layout, n_components, min_kronecker_size), seed)

    def description(self) -> dict:
        """JSON-serialisable description: seed, kind, shape and per-block structure."""
        return {"format": FORMAT, "version": VERSION, "kind": "kronecker+sparse_sign",
                "seed": self.seed, "n_components": self.n_components,
                "n_params": self.n_params, "layout": self.layout.to_dict(),
                "blocks": [b.to_dict(self.layout) for b in self.blocks]}

    @classmethod
    def from_description(cls, desc: Mapping | Projection) -> Projection:
        """The projection a :meth:`description` describes (a projection is returned as is).

        Parameters
        ----------
        desc : dict or Projection

        Returns
        -------
        projection : Projection
        """
        if isinstance(desc, Projection):
            return desc
        if not isinstance(desc, Mapping) or desc.get("format") != FORMAT:
            raise ValueError("projection must be a Projection or its description() (a dict "
                             f"of format {FORMAT!r}); got {type(desc).__name__}.")
        if int(desc.get("version", 0)) > VERSION:
            raise ValueError(f"projection description version {desc['version']} is newer "
                             "than supported.")
        layout = ParameterLayout.from_dict(desc["layout"])
        index = {n: i for i, n in enumerate(layout.names)}
        blocks = []
        for b in desc["blocks"]:
            if b["type"] == KroneckerBlock.type:
                blocks.append(KroneckerBlock(index[b["param"]], b["offset"], *b["in_shape"],
                                             *b["dims"]))
            elif b["type"] == SparseSignBlock.type:
                blocks.append(SparseSignBlock([index[n] for n in b["params"]], b["offset"],
                                              b["size"], b["dim"], b["nnz_per_column"]))
            else:
                raise ValueError(f"unknown projection block type {b['type']!r}.")
        proj = cls(layout, blocks, desc["seed"])
        if proj.n_components != int(desc["n_components"]):
            raise ValueError("inconsistent projection description: its blocks give "
                             f"{proj.n_components} rows, it says {desc['n_components']}.")
        return proj

    def __getstate__(self) -> dict:
        # the factor cache is rebuilt on demand and a lock cannot be pickled: a fitted
        # estimator holding a projection must survive pickle, joblib and deepcopy
        state = self.__dict__.copy()
        state["_cache"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        n_kron = len(self.block_of)
        return (f"Projection(n_components={self.n_components}, n_params={self.n_params}, "
                f"seed={self.seed}, kronecker_blocks={n_kron})")

    # -- factors --------------------------------------------------------------------------
    def kronecker_factors(self, block: KroneckerBlock, device, dtype
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out, P_in)`` of a Kronecker block on ``device`` in ``dtype`` (cached)."""
        key = (block.offset, str(device), dtype)
        got = self._cache.get(key)
        if got is None:
            gen = _block_generator(self.seed, self.blocks.index(block))
            p_out = torch.randn(block.d_out, block.n_out, generator=gen, dtype=torch.float64)
            p_in = torch.randn(block.d_in, block.n_in, generator=gen, dtype=torch.float64)
            p_out /= math.sqrt(block.d_out)
            p_in /= math.sqrt(block.d_in)
            got = (p_out.to(device=device, dtype=dtype), p_in.to(device=device, dtype=dtype))
            with self._lock:
                self._cache[key] = got
        return got

    def sparse_factors(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, values)`` of the sparse block, each ``(nnz, size)``: column ``q`` has
        ``values[t, q]`` in row ``rows[t, q]`` (cached)."""
        b = self.sparse
        key = ("sparse", str(device), dtype)
        got = self._cache.get(key)
        if got is None:
            gen = _block_generator(self.seed, self.blocks.index(b))
            bounds = [t * b.dim // b.nnz for t in range(b.nnz + 1)]
            width = torch.tensor([bounds[t + 1] - bounds[t] for t in range(b.nnz)],
                                 dtype=torch.float64)[:, None]
            start = torch.tensor(bounds[:-1], dtype=torch.long)[:, None]
            rows, vals = [], []
            for q0 in range(0, b.size, _SIGN_CHUNK):
                n = min(_SIGN_CHUNK, b.size - q0)
                u = torch.rand(b.nnz, n, generator=gen, dtype=torch.float64)
                rows.append(start + (u * width).long().clamp(max=width.long() - 1))
                sign = torch.randint(0, 2, (b.nnz, n), generator=gen, dtype=torch.int8)
                vals.append((sign.to(torch.float64) * 2 - 1) / math.sqrt(b.nnz))
            got = (torch.cat(rows, 1).to(device), torch.cat(vals, 1).to(device=device,
                                                                          dtype=dtype))
            with self._lock:
                self._cache[key] = got
        return got

    def _sparse_matrices(self, device, dtype, kind: str) -> tuple:
        """The sparse block as explicit sparse matrices on ``device`` (cached).

        ``kind="scipy"`` (the CPU): ``(S^T,)``, one SciPy CSR matrix ``(size, dim)`` (its
        transpose, a CSC view, serves ``S``); ``kind="torch"`` (other devices):
        ``(S, S^T)``, torch sparse CSR tensors. Exactly the entries of
        :meth:`sparse_factors`; each output entry is summed in a fixed order, whatever
        the batch and the threads.
        """
        key = ("sparse_csr", kind, str(device), dtype)
        got = self._cache.get(key)
        if got is None:
            rows, vals = self.sparse_factors("cpu", torch.float64)
            nnz, size = rows.shape
            # column q of S has one entry in each row group, so in increasing rows: row q
            # of S^T is already sorted, with exactly nnz entries
            indptr = torch.arange(0, size * nnz + 1, nnz, dtype=torch.long)
            indices, data = rows.T.reshape(-1), vals.T.reshape(-1)
            shape_t = (size, self.sparse.dim)
            if kind == "scipy":
                np_dtype = np.float32 if dtype == torch.float32 else np.float64
                got = (sp.csr_matrix((data.numpy().astype(np_dtype), indices.numpy(),
                                      indptr.numpy()), shape=shape_t),)
            else:
                st = torch.sparse_csr_tensor(indptr, indices, data, shape_t)
                s = torch.sparse_coo_tensor(
                    torch.stack([indices, torch.arange(size).repeat_interleave(nnz)]), data,
                    shape_t[::-1]).coalesce().to_sparse_csr()
                got = (s.to(device=device, dtype=dtype), st.to(device=device, dtype=dtype))
            with self._lock:
                self._cache[key] = got
        return got

    def sparse_matrix(self) -> sp.csr_matrix:
        """The sparse block's transpose ``S^T`` as a float64 SciPy CSR matrix
        ``(size, dim)`` (cached; its transpose, a CSC view, is ``S``)."""
        return self._sparse_matrices("cpu", torch.float64, "scipy")[0]

    def sparse_apply(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse block of ``x`` ``(k, size)`` (its parameters concatenated): ``(k, dim)``."""
        if not x.requires_grad and x.dtype in (torch.float32, torch.float64):
            # one sparse product (the scatter/gather form below serves autograd and
            # the other dtypes)
            if x.device.type == "cpu":
                (st,) = self._sparse_matrices(x.device, x.dtype, "scipy")
                xt = np.ascontiguousarray(x.numpy().T)
                return torch.from_numpy(np.ascontiguousarray((st.T @ xt).T))
            s, _ = self._sparse_matrices(x.device, x.dtype, "torch")
            return (s @ x.T.contiguous()).T.contiguous()
        rows, vals = self.sparse_factors(x.device, x.dtype)
        out = torch.zeros((x.shape[0], self.sparse.dim), dtype=x.dtype, device=x.device)
        for t in range(rows.shape[0]):
            out.index_add_(1, rows[t], x * vals[t])
        return out

    def sparse_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`sparse_apply`: ``(k, dim)`` to ``(k, size)``."""
        if not y.requires_grad and y.dtype in (torch.float32, torch.float64):
            # one sparse product (the scatter/gather form below serves autograd and
            # the other dtypes)
            if y.device.type == "cpu":
                (st,) = self._sparse_matrices(y.device, y.dtype, "scipy")
                yt = np.ascontiguousarray(y.numpy().T)
                return torch.from_numpy(np.ascontiguousarray((st @ yt).T))
            _, st = self._sparse_matrices(y.device, y.dtype, "torch")
            return (st @ y.T.contiguous()).T.contiguous()
        rows, vals = self.sparse_factors(y.device, y.dtype)
        out = y[:, rows[0]] * vals[0]
        for t in range(1, rows.shape[0]):
            out.addcmul_(y[:, rows[t]], vals[t])
        return out

    # -- the operator -----------------------------------------------------------------------
    def _as_tensor(self, x, width: int, what: str):
        refuse_projected(x, what)
        if sp.issparse(x):
            x = x.toarray()
        is_np = not isinstance(x, torch.Tensor)
        t = torch.from_numpy(np.asarray(x)) if is_np else x
        if not t.is_floating_point():
            t = t.to(torch.float64)
        one = t.dim() == 1
        t2 = t[None] if one else t
        if t2.dim() != 2 or t2.shape[1] != width:
            raise ValueError(f"{what} must have shape ({width},) or (k, {width}); got "
                             f"{tuple(t.shape)}.")
        return t2, is_np, one

    def apply(self, x):
        """``R x`` for ``x`` of shape ``(n_params,)`` or ``(k, n_params)``.

        Parameters
        ----------
        x : ndarray, torch.Tensor or sparse matrix
            Unprojected vectors in the layout's flat order, one per row. Projected PEFs
            are refused.

        Returns
        -------
        y : same kind as ``x`` (dense), shape ``(n_components,)`` or ``(k, n_components)``
        """
        t, is_np, one = self._as_tensor(x, self.n_params, "x")
        out = torch.empty((t.shape[0], self.n_components), dtype=t.dtype, device=t.device)
        lay = self.layout
        for b in self.blocks:
            if isinstance(b, KroneckerBlock):
                p_out, p_in = self.kronecker_factors(b, t.device, t.dtype)
                o = lay.offsets[b.pid]
                w = t[:, o : o + lay.sizes[b.pid]].reshape(-1, b.n_out, b.n_in)
                out[:, b.offset : b.offset + b.dim] = (p_out @ w @ p_in.T).reshape(-1, b.dim)
            else:
                xs = torch.cat([t[:, lay.offsets[p] : lay.offsets[p] + lay.sizes[p]]
                                for p in b.pids], 1)
                out[:, b.offset : b.offset + b.dim] = self.sparse_apply(xs)
        out = out[0] if one else out
        return out.numpy() if is_np else out

    def adjoint(self, y):
        """``R^T y`` for ``y`` of shape ``(n_components,)`` or ``(k, n_components)``.

        Parameters
        ----------
        y : ndarray or torch.Tensor

        Returns
        -------
        x : same kind as ``y``, shape ``(n_params,)`` or ``(k, n_params)``
        """
        t, is_np, one = self._as_tensor(y, self.n_components, "y")
        out = torch.empty((t.shape[0], self.n_params), dtype=t.dtype, device=t.device)
        lay = self.layout
        for b in self.blocks:
            yb = t[:, b.offset : b.offset + b.dim]
            if isinstance(b, KroneckerBlock):
                p_out, p_in = self.kronecker_factors(b, t.device, t.dtype)
                o = lay.offsets[b.pid]
                w = p_out.T @ yb.reshape(-1, b.d_out, b.d_in) @ p_in
                out[:, o : o + lay.sizes[b.pid]] = w.reshape(t.shape[0], -1)
            else:
                xs = self.sparse_adjoint(yb)
                for p in b.pids:
                    q = self.sparse_offset[p]
                    o = lay.offsets[p]
                    out[:, o : o + lay.sizes[p]] = xs[:, q : q + lay.sizes[p]]
        out = out[0] if one else out
        return out.numpy() if is_np else out
