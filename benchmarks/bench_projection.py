"""Projected PEFs against top-K PEFs (same model, same batches), and recovery quality.

Reproduce (2 CPU cores, torch 2.13 CPU)::

    .venv/bin/python benchmarks/bench_projection.py                # mlp, cnn, recovery
    .venv/bin/python benchmarks/bench_projection.py --models mlp cnn resnet18 bert
    .venv/bin/python benchmarks/bench_projection.py --threads 1    # on a busy machine

Throughput: ``PEFTransformer(kind="low_rank", n_classes=10)`` (bert: its 3 labels) with
``compression="topk"`` (``n_values=--n-values``) and ``compression="projection"``
(``n_values=--dim``), examples per second of ``compute``, best of ``--repeats`` runs
interleaved (top-K, projection, top-K, ...). Memory: peak RSS of a fresh process
streaming ``iter_compute`` over ``--memory-sizes`` examples (128 and 1024 unless
told; results dropped). Recovery: planted ``s``-sparse vectors in the mlp's parameter
space, projected and brought back by ``recover_components``; mean and minimum ``|cos|``
against ``d / s`` and ``d / (s log(m / s))``.

Models: ``mlp`` and ``cnn`` of ``bench_pef.py``; ``resnet18``: the ImageNet ResNet-18
of ``bench_resnet18.py`` (1000-way head, 11,689,512 parameters, random weights), PEFs
over its 10 most probable classes, on ``--resnet-size`` inputs (32x32 unless told);
``bert``: a BERT-style classifier of 4 layers, hidden 512, 8 heads, intermediate 2048
(as in ``bench_threads.py``; needs ``transformers``), sequences of 32 tokens, 3 labels.

Measured 2026-12-01 on the shared 2-core machine (other jobs running, so absolute
figures are noisy; the ratios come from interleaved runs), one torch thread, K =
65536, d = 8192 per slot, with the block plan of this version (matrices of at least
``MIN_KRONECKER_SIZE`` entries in Kronecker blocks, the rest in the sparse sign
block). ``--models mlp cnn --quick --threads 1 --no-recovery``::

    model      params      top-K ex/s  projection ex/s  ratio
    mlp           272,394     23.1        1183.3         51.3x
    cnn           225,034     21.0          93.4          4.45x
    peak RSS (MB), streaming 128 / 1024 examples: mlp top-K 903 / 938, projection
    402 / 399; cnn top-K 921 / 1005, projection 639 / 645

resnet18 (1000 classes, top 10, 32x32 inputs) and bert, batch 32, ``--models resnet18
bert --threads 1 --n-examples 32 --repeats 2 --memory-sizes 32 128 --no-recovery``::

    model      params      top-K ex/s  projection ex/s  ratio
    resnet18   11,689,512      3.6          31.4          8.63x
    bert       17,037,315      3.4          14.2          4.18x
    peak RSS (MB), streaming 32 / 128 examples: resnet18 top-K 1279 / 1381,
    projection 757 / 776; bert top-K 1466 / 1600, projection 1357 / 1469

Peak memory does not grow with the examples: 32 is one batch, and the step to 128 is
the second batch's allocations; 512 examples (``--memory-worker``, the previous block
plan) peaked no higher (resnet18 projection 770 MB, bert 1501 MB; run to run, +-50
MB). With every small matrix of ResNet-18 in the sparse block as well (threshold
``2**16``: its 3x3 convolutions of 64 channels and 1x1 downsampling convolutions
included), projection fell to 2.01x: writing out a convolution's per-example gradient
costs about as much as top-K's, which is why the threshold is ``2**13``. Earlier runs
of the previous plan gave 6.85x-7.90x (resnet18) and 2.87x-4.03x (bert, the lower
before ``Contribution.gram`` stopped copying a sequence Linear's cotangents). Profiled
(``torch.profiler``, one batch of 32, bert, projection): of 4.4 s, the model's forward
and 3 backward passes (one per class slot) take about 3.0 s, which top-K pays as well;
stacking the per-class cotangents 0.3-0.4 s, the exact PEF norms' Gram products 0.35 s,
the projections themselves 0.15 s.

On one H200 (torch 2.11, CUDA 13, 16 host threads), 2026-12-01,
``--device cuda --models mlp cnn resnet18 bert --n-examples 256 --repeats 3
--no-memory --no-recovery`` (resnet18 then had a 10-way head, 11,181,642 parameters)::

    model      params      top-K ex/s  projection ex/s  ratio
    mlp           272,394    897.8        2162.0         2.41x
    cnn           225,034    735.6        1743.8         2.37x
    resnet18   11,181,642     71.1         704.3         9.90x
    bert       17,037,315     97.7        1265.4        12.95x

Against a small top-K (``--n-values 4096``, same settings, mlp and cnn only): 4.1x
(mlp, 90.8 vs 370.8 ex/s) and 1.05x (cnn, 19.1 vs 20.1 ex/s). The cnn's projected
time is mostly its 10 backward passes (1.1 of 3.1 s per 64 examples, profiled), which
both paths share.

Recovery (mlp 64-128-10, 9,610 parameters, 8 planted ``s``-sparse vectors; mean / min
``|cos|``; ``R^T h``'s mean for comparison), with the whole operator one sparse sign
block and with every matrix in a Kronecker block (``min_kronecker_size=0``), measured
2026-12-01 (one thread)::

    s   d/(s log(m/s))   d/s    sparse sign block   Kronecker blocks    adjoint
    5        1            7     0.89 / 0.47         0.16 / 0.00         0.06
    5        2           15     1.000 / 1.000       0.47 / 0.00         0.09
    5        4           30     1.000 / 1.000       0.70 / 0.19         0.12
    5        8           60     1.000 / 1.000       1.000 / 1.000       0.18
    10       1            7     0.80 / 0.39         0.29 / 0.00         0.09
    10       2           14     1.000 / 1.000       0.57 / 0.08         0.12
    10       4           27     1.000 / 1.000       0.96 / 0.87         0.17
    10       8           55     1.000 / 1.000       1.000 / 1.000       0.23
    20       1            6     0.85 / 0.46         0.40 / 0.08         0.11
    20       2           12     1.000 / 1.000       0.90 / 0.73         0.16
    20       4           25     1.000 / 1.000       0.999 / 0.995       0.22
    20       8           49     1.000 / 1.000       1.000 / 1.000       0.31

The sparse sign block recovers exactly from twice ``s log(m / s)``; Kronecker blocks
(less incoherent: columns sharing an input or output index are correlated) need up to
eight times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make(name: str, resnet_size: int = 32):
    """(model, X, n_classes): n_classes is the number of PEF class slots."""
    torch.manual_seed(0)
    if name in ("mlp", "cnn"):
        from bench_pef import make_model

        model, X = make_model(name)
        return model.eval(), X, 10
    if name == "resnet18":
        from bench_resnet18 import resnet18

        # The ImageNet architecture (1000-way head); PEFs over its 10 most probable
        # classes, as in the paper. Small inputs keep it CPU-sized.
        X = torch.randn(64, 3, resnet_size, resnet_size)
        return resnet18(1000).eval(), X, 10
    if name == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=8000, hidden_size=512, num_hidden_layers=4,
                         num_attention_heads=8, intermediate_size=2048,
                         max_position_embeddings=128, num_labels=3)
        model = BertForSequenceClassification(cfg).eval()
        gen = torch.Generator().manual_seed(0)
        X = {"input_ids": torch.randint(0, 8000, (64, 32), generator=gen),
             "attention_mask": torch.ones(64, 32, dtype=torch.long)}
        return model, X, 3
    raise ValueError(name)


def _rows(X, n):
    if isinstance(X, dict):
        return {k: v[:n] for k, v in X.items()}
    return X[:n]


def transformer(model, n_classes, compression, args):
    from sknpeff import PEFTransformer

    n_values = args.n_values if compression == "topk" else args.dim
    return PEFTransformer(model, kind="low_rank", n_classes=n_classes, n_values=n_values,
                          compression=compression, batch_size=args.batch_size)


def throughput(name, args):
    model, X, c = make(name, args.resnet_size)
    model = model.to(args.device)
    n = args.n_examples
    X = _rows(X, n)
    trs = {k: transformer(model, c, k, args).fit(X) for k in ("topk", "projection")}
    for tr in trs.values():
        tr.compute(_rows(X, args.batch_size))  # warm-up and the one-batch check
    best = {k: float("inf") for k in trs}
    for _ in range(args.repeats):
        for k, tr in trs.items():
            _sync(args.device)
            t = time.perf_counter()
            tr.compute(X)
            _sync(args.device)
            best[k] = min(best[k], time.perf_counter() - t)
    n_ex = len(X["input_ids"]) if isinstance(X, dict) else len(X)
    eps = {k: n_ex / v for k, v in best.items()}
    return dict(model=name, n_params=trs["topk"].n_params_, topk=eps["topk"],
                projection=eps["projection"], ratio=eps["projection"] / eps["topk"])


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def memory_worker(name, compression, n, args):
    """Peak RSS (MB) of streaming n examples (run in a fresh process)."""
    warnings.simplefilter("ignore")
    model, X, c = make(name, args.resnet_size)
    reps = -(-n // (len(X["input_ids"]) if isinstance(X, dict) else len(X)))
    if isinstance(X, dict):
        X = {k: v.repeat(reps, 1)[:n] for k, v in X.items()}
    else:
        X = X.repeat(reps, *([1] * (X.dim() - 1)))[:n]
    tr = transformer(model, c, compression, args).fit(X)
    for _ in tr.iter_compute(X):
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def memory(name, args):
    out = {}
    for comp in ("topk", "projection"):
        for n in args.memory_sizes:
            cmd = [sys.executable, __file__, "--memory-worker", name, comp, str(n),
                   "--threads", str(args.threads), "--dim", str(args.dim),
                   "--n-values", str(args.n_values), "--batch-size", str(args.batch_size),
                   "--resnet-size", str(args.resnet_size)]
            got = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[f"{comp}_{n}"] = float(got.stdout.strip().splitlines()[-1])
    return out


def recovery(args):
    from sknpeff.layout import ParameterLayout
    from sknpeff.pef import Projection, recover_components

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    layout = ParameterLayout.from_model(model)
    m = layout.n_params
    rng = np.random.default_rng(0)
    rows = []
    for s in (5, 10, 20):
        base = s * math.log(m / s)
        for mult in (1, 2, 4, 8):
            d = min(m, int(mult * base))
            G = np.zeros((args.n_planted, m))
            for k in range(args.n_planted):
                G[k, rng.choice(m, s, replace=False)] = rng.standard_normal(s)
            # the two block kinds: one sparse sign block, and every matrix Kronecker
            for block, min_size in (("sparse", m + 1), ("kronecker", 0)):
                R = Projection.for_layout(layout, d, seed=1, min_kronecker_size=min_size)
                H = R.apply(G)
                rec = recover_components(H, R).toarray()
                cos = np.abs((rec * G).sum(1)) / np.maximum(
                    np.linalg.norm(rec, axis=1) * np.linalg.norm(G, axis=1), 1e-300)
                adj = R.adjoint(H)
                cos_adj = np.abs((adj * G).sum(1)) / (np.linalg.norm(adj, axis=1)
                                                       * np.linalg.norm(G, axis=1))
                rows.append(dict(block=block, s=s, d=d, d_over_s=d / s, mult=mult,
                                 mean=float(cos.mean()), min=float(cos.min()),
                                 adjoint=float(cos_adj.mean())))
    return m, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--n-values", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--n-planted", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer examples and repeats")
    ap.add_argument("--device", default="cpu", help="torch device of the model (throughput)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--memory-sizes", nargs=2, type=int, default=[128, 1024],
                    metavar=("N1", "N2"), help="numbers of examples streamed (memory)")
    ap.add_argument("--resnet-size", type=int, default=32,
                    help="resnet18 input height and width")
    ap.add_argument("--memory-worker", nargs=3, metavar=("MODEL", "COMPRESSION", "N"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.memory_worker:
        name, comp, n = args.memory_worker
        print(memory_worker(name, comp, int(n), args))
        return
    if args.quick:
        args.n_examples, args.repeats, args.n_planted = 128, 2, 4
    print(f"threads={args.threads} K={args.n_values} d={args.dim} "
          f"batch={args.batch_size} examples={args.n_examples}")
    for name in args.models:
        r = throughput(name, args)
        line = (f"{name:9s} {r['n_params']:>10,d} params  top-K {r['topk']:8.1f} ex/s  "
                f"projection {r['projection']:8.1f} ex/s  ratio {r['ratio']:5.2f}x")
        print(line, flush=True)
        if not args.no_memory:
            mem = memory(name, args)
            n1, n2 = args.memory_sizes
            print(f"{'':9s} peak RSS MB, {n1} / {n2} examples: top-K {mem[f'topk_{n1}']:.0f}"
                  f" / {mem[f'topk_{n2}']:.0f}, projection {mem[f'projection_{n1}']:.0f} / "
                  f"{mem[f'projection_{n2}']:.0f}", flush=True)
    if not args.no_recovery:
        m, rows = recovery(args)
        print(f"recovery, mlp 64-128-10 ({m} params), {args.n_planted} planted vectors each:")
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
