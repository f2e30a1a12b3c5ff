"""Initializations of the factor and coefficients, free functions of the prepared input.

D-NPEFF: NNDSVD(a) from a randomized truncated SVD computed with the blocked sparse
products, or uniform random. LRM-NPEFF: each component seeded with one row of the data,
chosen k-means++-style, or Gaussian random.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ._base import Problem

__all__ = ["diagonal_init", "lowrank_init_factor", "nndsvd", "sq_sum"]

#: extra random directions of the randomized range finder used by the NNDSVD init
_OVERSAMPLE = 10
#: rows per chunk when forming NNDSVD's right singular vectors (bounded memory)
_V_CHUNK = 1 << 13
#: power iterations of the randomized range finder
_POWER_ITERS = 3


def diagonal_init(prob: Problem, r: int, init: str, rng: np.random.RandomState
                  ) -> tuple[Any, list[Any]]:
    """Initial ``W`` (n, r) on the backend and ``Ft`` split into partitions (D-NPEFF).

    ``init`` as :class:`~sknpeff.decomposition.DiagonalNPEFF` takes it.
    """
    blocks = prob.blocks
    n, m = prob.n_samples, blocks.n_cols
    dtype = np.dtype(prob.dtype)
    mean = _mean_of(prob)
    init = "nndsvda" if init == "auto" else init
    if init == "random":
        avg = np.sqrt(mean / r)
        Ft = _draw(rng.uniform, (m, r), dtype, 2.0 * avg)
        W = _draw(rng.uniform, (n, r), dtype, 2.0 * avg)
        parts = blocks.split_factor(Ft, dtype=dtype, copy=False)  # handed over
        del Ft
        return blocks.backend.asarray(W), parts
    W, parts = nndsvd(prob, r, rng)
    fill = mean if init == "nndsvda" else 0.0
    backend = blocks.backend
    if fill > 0:
        W[W == 0] = fill
        for i, p in enumerate(parts):
            with backend.device(i):  # each part is worked on where it lives
                p[p == 0] = fill
    return W.astype(dtype, copy=False), [backend.asarray(p, dtype=dtype, partition=i)
                                         for i, p in enumerate(parts)]


def nndsvd(prob: Problem, r: int, rng: np.random.RandomState) -> tuple[Any, list[Any]]:
    """NNDSVD (Boutsidis & Gallopoulos 2008) with ``r`` components, from a randomized
    truncated SVD through the blocked products (no dense copy of the input)."""
    blocks = prob.blocks
    backend = blocks.backend
    xp = backend.xp
    n, m = prob.n_samples, blocks.n_cols
    dtype = np.dtype(prob.dtype)
    k = min(r, n, m)
    q = min(k + _OVERSAMPLE, n, m)
    # every random draw depends only on (n, m', r): the same for any partitioning
    omega = _draw(rng.standard_normal, (m, q), dtype)
    # components beyond the rank of X start random (drawn only when needed)
    W_rand = rng.uniform(size=(n, r - k)) if r > k else None
    F_rand = _draw(rng.uniform, (m, r - k), dtype) if r > k else None
    parts = blocks.split_factor(omega, dtype=dtype, copy=False)  # handed over
    del omega
    Q = _orthonormal(xp, blocks.matmul(parts))
    del parts
    for _ in range(_POWER_ITERS):
        Q = _orthonormal(xp, blocks.matmul(blocks.rmatmul(Q)))
    Bt = blocks.rmatmul(Q)  # X.T @ Q, per partition (m_p, q)
    Gm = _gram_f64(backend, Bt)  # Q.T X X.T Q = Ub S^2 Ub.T
    evals, evecs = np.linalg.eigh(backend.to_numpy(Gm))
    order = np.argsort(evals)[::-1][:k]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    Ub = evecs[:, order]
    inv_s = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
    U = backend.to_numpy(Q).astype(np.float64) @ Ub  # (n, k)
    Vk = (Ub * inv_s).astype(dtype)

    def v_chunks(i: int) -> Any:
        """Right singular vectors of partition i, ``Bt[i] @ Vk``, in row chunks (so
        the whole (m', k) matrix never exists beside Bt and the output)."""
        b = Bt[i]
        for c0 in range(0, b.shape[0], _V_CHUNK):
            yield c0, backend.to_numpy(b[c0:c0 + _V_CHUNK]) @ Vk

    # split each singular pair into its positive and negative parts (NNDSVD)
    up, un = np.maximum(U, 0), np.maximum(-U, 0)
    nup, nun = np.linalg.norm(up, axis=0), np.linalg.norm(un, axis=0)
    sq_p, sq_n = [], []
    for i in range(len(Bt)):  # pass 1: column norms of the positive/negative parts
        acc_p, acc_n = np.zeros(k), np.zeros(k)
        for _, v in v_chunks(i):
            acc_p += np.sum(np.maximum(v, 0) ** 2, axis=0)
            acc_n += np.sum(np.maximum(-v, 0) ** 2, axis=0)
        sq_p.append(backend.asarray(acc_p, partition=i))
        sq_n.append(backend.asarray(acc_n, partition=i))
    vsq_p = backend.to_numpy(backend.allreduce(sq_p))
    vsq_n = backend.to_numpy(backend.allreduce(sq_n))
    nvp, nvn = np.sqrt(vsq_p), np.sqrt(vsq_n)
    pos = nup * nvp >= nun * nvn
    sigma = np.where(pos, nup * nvp, nun * nvn)
    nu = np.where(pos, nup, nun)
    nv = np.where(pos, nvp, nvn)
    ok = (nu > 0) & (nv > 0) & (s > 0)
    cw = np.where(ok, np.sqrt(s * sigma) / np.where(nu > 0, nu, 1), 0.0)
    ch = np.where(ok, np.sqrt(s * sigma) / np.where(nv > 0, nv, 1), 0.0)
    W = np.empty((n, r), dtype=np.float64)
    W[:, :k] = np.where(pos, up, un) * cw
    mean_scale = np.sqrt(_mean_of(prob) / r)
    if r > k:
        W[:, k:] = mean_scale * W_rand
    out_parts = []
    sign = np.where(pos, 1.0, -1.0).astype(dtype)
    ch = ch.astype(dtype)
    for i, (s0, e0) in enumerate(blocks.partition_ranges):  # pass 2: the factor
        b = Bt[i]
        if backend.on_host and b.flags.c_contiguous and b.dtype == dtype \
                and b.shape[1] >= r:  # a host buffer (not a device array)
            # write the factor into X.T @ Q's own buffer: row j of F lands before row
            # j of Bt (r <= q columns), and each chunk of Bt is read before the rows
            # it overwrites are written, so no second (m', r) array is needed
            F = b.reshape(-1)[:(e0 - s0) * r].reshape(e0 - s0, r)
        else:
            F = np.empty((e0 - s0, r), dtype=dtype)
        del b
        for c0, v in v_chunks(i):
            v *= sign
            np.maximum(v, 0, out=v)
            v *= ch
            F[c0:c0 + v.shape[0], :k] = v
        Bt[i] = None  # free this partition's X.T @ Q before the next factor part
        if r > k:
            F[:, k:] = mean_scale * F_rand[s0:e0]
        out_parts.append(backend.asarray(F, partition=i))
    return backend.asarray(W.astype(dtype)), out_parts


def lowrank_init_factor(prob: Problem, r: int, init: str, rng: np.random.RandomState
                        ) -> np.ndarray:
    """Transposed factor ``Ft`` (m', r) on the host (LRM-NPEFF).

    ``"data"`` (and ``"auto"``): each ``g_k`` is one row of ``A`` (an example's
    ``a_ij``) from the random pool in ``prob.extras``, drawn k-means++-style.
    ``"random"``: Gaussian entries of variance ``2 / (r m')``.

    Frozen components (``prob.extras["frozen"]``, ``(r0, m')``, set by a fit with
    ``frozen_components``) fill the first ``r0`` columns and count as already drawn:
    the data rows they explain are unlikely seeds for the new components, which would
    otherwise start on (and may stay on) a frozen component's examples.
    """
    m = prob.blocks.n_cols
    dtype = prob.dtype
    frozen = prob.extras.pop("frozen", None)
    r0 = 0 if frozen is None else frozen.shape[0]
    if init == "random":
        sigma = np.sqrt(2.0 / (r * max(m, 1)))
        Ft = (rng.standard_normal((m, r)) * sigma).astype(dtype)
        if r0:
            Ft[:, :r0] = frozen.T
        return Ft
    pool, norms = prob.extras.pop("pool"), prob.extras.pop("pool_norms")
    Ft = np.zeros((m, r), dtype=dtype)
    n_seeded = r0
    if r0:
        Ft[:, :r0] = frozen.T
    if pool.shape[0]:
        pool = sp.diags((1.0 / norms).astype(pool.dtype)) @ pool  # unit rows
        max_cos = np.zeros(pool.shape[0])
        for k in range(r0):
            g = Ft[:, k].astype(np.float64)
            nrm = np.linalg.norm(g)
            if nrm > 0:
                max_cos = np.maximum(max_cos, np.abs(pool @ (g / nrm)))
        chosen: list[int] = []
        for k in range(r0, min(r, r0 + pool.shape[0])):
            weight = (1.0 - max_cos) ** 2
            weight[chosen] = 0.0
            if weight.sum() <= 1e-12:
                break
            pick = int(rng.choice(pool.shape[0], p=weight / weight.sum()))
            chosen.append(pick)
            row = pool[pick]
            Ft[row.indices, k] = row.data
            max_cos = np.maximum(max_cos, np.abs(pool @ Ft[:, k]))
        n_seeded = r0 + len(chosen)
    if n_seeded < r:  # fewer distinct data rows than components: random directions
        extra = rng.standard_normal((m, r - n_seeded))
        Ft[:, n_seeded:] = extra / np.maximum(np.linalg.norm(extra, axis=0), 1e-30)
    return Ft


def _draw(sampler: Any, shape: tuple[int, int], dtype: Any, scale: float = 1.0,
          chunk: int = 1 << 13) -> np.ndarray:
    """Random array drawn in row chunks straight into ``dtype`` (no float64 copy of the
    whole array); the values are the same as one ``sampler(size=shape)`` call."""
    out = np.empty(shape, dtype=dtype)
    for s in range(0, shape[0], chunk):
        e = min(shape[0], s + chunk)
        out[s:e] = sampler(size=(e - s, shape[1]))
    if scale != 1.0:
        out *= scale
    return out


def sq_sum(data: np.ndarray, chunk: int = 1 << 20) -> float:
    """Sum of squares in float64, chunk by chunk (no float64 copy of the whole array)."""
    total = 0.0
    for s in range(0, data.shape[0], chunk):
        d = data[s:s + chunk].astype(np.float64)
        total += float(d @ d)
    return total


def _mean_of(prob: Problem) -> float:
    """Mean of the pruned matrix ``A`` (n x m'), from the sum ``_prepare`` records."""
    return prob.extras["sum"] / max(1, prob.n_samples * prob.blocks.n_cols)


def _orthonormal(xp: Any, Y: Any) -> Any:
    """An orthonormal basis of the columns of ``Y`` (reduced QR)."""
    Q, _ = xp.linalg.qr(Y)
    return Q


def _gram_f64(backend: Any, parts: list[Any], chunk: int = 1 << 13) -> Any:
    """``sum_p parts[p].T @ parts[p]`` accumulated in float64, chunk by chunk (small
    chunks: the float64 copies stay a few MiB)."""
    xp = backend.xp
    outs = []
    for i, p in enumerate(parts):
        with backend.device(i):  # each partial sum on its part's device
            g = xp.zeros((p.shape[1], p.shape[1]), dtype=xp.float64)
            for s in range(0, p.shape[0], chunk):
                c = p[s:s + chunk].astype(xp.float64)
                g += c.T @ c
        outs.append(g)
    return backend.allreduce(outs)
