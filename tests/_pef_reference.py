"""Naive references and tiny models for the PEF tests (not a test module)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def naive_a(model, x_list, params=None, n_classes=None, min_class_prob=None,
            forward=None, dtype=torch.float64):
    """Dense per-example ``(n_slots, n_params)`` matrices of ``a_ij`` by a plain loop.

    ``x_list``: list of per-example batches of size one. Slots ordered by descending
    probability; dropped classes give zero slots.
    """
    named = [(n, p) for n, p in model.named_parameters()
             if (p.requires_grad if params is None else n in params)]
    ps = [p for _, p in named]
    out = []
    for xb in x_list:
        logits = model(xb) if forward is None else forward(model, xb)
        if hasattr(logits, "logits"):
            logits = logits.logits
        logp = torch.log_softmax(logits.to(dtype), dim=1)[0]
        p = logp.exp()
        K = p.shape[0]
        c = K if n_classes is None else n_classes
        order = torch.argsort(p, descending=True)[:c]
        rows = []
        for j in order.tolist():
            if min_class_prob is not None and p[j] < min_class_prob:
                rows.append(None)
                continue
            gs = torch.autograd.grad(logp[j], ps, retain_graph=True, allow_unused=True)
            v = torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1).to(dtype)
                           for g, q in zip(gs, ps)])
            rows.append(torch.sqrt(p[j]).detach() * v)
        m = sum(q.numel() for q in ps)
        A = torch.stack([torch.zeros(m, dtype=dtype) if r is None else r for r in rows])
        out.append(A.detach().numpy())
    return np.stack(out)


def lrm_rows(A, normalize=True):
    """Low-rank rows and norms from dense ``(n, c, m)`` a's."""
    S = np.einsum("ncm,ndm->ncd", A, A)
    norms = np.sqrt((S ** 2).sum((1, 2)))
    rows = A.reshape(A.shape[0], -1).copy()
    if normalize:
        rows = rows / np.sqrt(np.maximum(norms, 1e-300))[:, None]
    return rows, norms


def diag_rows(A, normalize=True):
    f = (A ** 2).sum(1)
    norms = np.linalg.norm(f, axis=1)
    if normalize:
        f = f / np.maximum(norms, 1e-300)[:, None]
    return f, norms


def topk_dense(rows, k):
    """Dense rows keeping only the k largest |entries| (exact zeros dropped)."""
    out = np.zeros_like(rows)
    for i, r in enumerate(rows):
        idx = np.argsort(-np.abs(r), kind="stable")[:k]
        out[i, idx] = r[idx]
    return out


class MLP(nn.Module):
    def __init__(self, d_in=6, h=7, k=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, h),
                                 nn.ReLU(inplace=True), nn.Linear(h, k))

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self, k=5):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2, padding="valid", bias=False)
        self.c3 = nn.Conv1d(4, 3, 2, padding="same", padding_mode="reflect")
        self.fc = nn.Linear(3 * 9, k)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))  # (B, 4, 3, 3)
        h = self.c3(h.flatten(2))  # (B, 3, 9)
        return self.fc(torch.tanh(h).flatten(1))


class SeqNet(nn.Module):
    """Embedding + LayerNorm + MultiheadAttention + seq Linear + a tied weight."""

    def __init__(self, vocab=11, d=8, k=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.proj = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, k)

    def forward(self, input_ids, mask=None):
        h = self.ln(self.emb(input_ids))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = torch.tanh(self.proj(h + a))  # sequence Linear
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        if mask is not None:
            h = h * mask[..., None]
        return self.head(h.mean(1))


class TiedNet(nn.Module):
    """Embedding weight reused outside the Embedding module (must be detected)."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids).mean(1)))
        return h @ self.emb.weight.t()


class SeqFirstNet(nn.Module):
    """A Linear applied to (T, B, D) activations: its first axis is not the batch axis."""

    def __init__(self, d=4, k=3):
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.head = nn.Linear(d, k)

    def forward(self, x):  # x: (B, T, D)
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # (T, B, D)
        return self.head(h.mean(0))


def make_model(name, dtype=torch.float64, seed=0):
    """(model, X as a batched tensor, list of single-example batches)."""
    torch.manual_seed(seed)
    if name == "mlp":
        model, X = MLP(), torch.randn(9, 6)
    elif name == "conv":
        model, X = ConvNet(), torch.randn(6, 2, 8, 8)
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    elif name == "seq":
        model = SeqNet()
        X = torch.randint(0, 11, (7, 5))
        X[0, 3:] = 0  # padding tokens
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    elif name == "tied":
        model, X = TiedNet(), torch.randint(0, 7, (5, 3))
    elif name == "seqfirst":
        model, X = SeqFirstNet(), torch.randn(5, 5, 4)
    else:  # pragma: no cover
        raise ValueError(name)
    model = model.to(dtype).eval()
    if X.is_floating_point():
        X = X.to(dtype)
    return model, X, [X[i : i + 1] for i in range(X.shape[0])]
