"""PEF throughput against torch's intra-op threads and ``n_jobs``, idle and under load.

Reproduce (2 CPU cores, torch 2.13 CPU, transformers installed)::

    .venv/bin/python benchmarks/bench_threads.py            # ~5 minutes
    .venv/bin/python benchmarks/bench_threads.py --load 0   # idle machine only

Model: a BERT-style classifier built from a config (4 layers, hidden 512, 8 heads, vocab
8,000, 3 labels, 17.0M parameters), sequences of 32 tokens, batches of 8, K = 4096.
Settings, each in a fresh process, best of ``--repeats``:

* ``1 thread``: ``torch.set_num_threads(1)``, one batch at a time;
* ``N threads``: torch's default (one intra-op thread per core), one batch at a time;
* ``n_jobs=N``: N batches at once, each on one intra-op thread (``PEFTransformer``
  shares out the threads).

``--load L`` starts L busy processes (pure Python loops) for the loaded rows: the
situation of a shared machine. The peer row ``fwd+bwd`` is one ordinary forward and
backward pass of the same batches under the same settings. Ratios are to the best
setting of the same row.

Measured 2026-11-30 (2 cores; low rank, best of 2), examples/s (ratio to the best):

    idle              PEFs      1 thread 2.17 (0.56)  2 threads 3.43 (0.89)  n_jobs=2 3.85 (1.00)
                      fwd+bwd   1 thread 17.3 (0.60)  2 threads 28.6 (1.00)
    2 busy processes  PEFs      1 thread 1.47 (0.68)  2 threads 0.96 (0.44)  n_jobs=2 2.17 (1.00)
                      fwd+bwd   1 thread 11.9 (1.00)  2 threads 7.61 (0.64)

Why the PEF engine is more sensitive to load than a forward and backward pass: it runs
many more, smaller parallel regions per example (one backward per class slot, per-layer
products, the selection's gathers and top-k), and every region ends at a barrier that
waits for the thread a busy core has descheduled. ``n_jobs`` runs whole batches on
single-threaded workers instead: no barrier between the cores, best idle and loaded here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def worker(n_threads: int, n_jobs: int | None, kind: str, repeats: int) -> dict:
    import warnings

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sknpeff import PEFTransformer

    warnings.simplefilter("ignore")
    torch.set_num_threads(n_threads)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8000, hidden_size=512, num_hidden_layers=4,
                     num_attention_heads=8, intermediate_size=2048,
                     max_position_embeddings=128, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    n = 32
    gen = torch.Generator().manual_seed(0)
    X = {"input_ids": torch.randint(0, 8000, (n, 32), generator=gen),
         "attention_mask": torch.ones(n, 32, dtype=torch.long)}
    pt = PEFTransformer(model, kind=kind, n_values=4096, batch_size=8, n_jobs=n_jobs).fit(X)
    pt.compute({k: v[:8] for k, v in X.items()})  # the one-batch check, warm-up
    pef = fb = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        pt.compute(X)
        pef = min(pef, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, n, 8):
            model.zero_grad(set_to_none=True)
            model(**{k: v[i:i + 8] for k, v in X.items()}).logits.sum().backward()
        fb = min(fb, time.perf_counter() - t)
    return {"pef": n / pef, "fwd_bwd": n / fb,
            "params": sum(p.numel() for p in model.parameters())}


def _run(args, n_threads: int, n_jobs: int | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n_threads),
           str(n_jobs), args.kind, str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=2, help="busy processes for the loaded rows")
    ap.add_argument("--kind", default="low_rank", choices=["low_rank", "diagonal"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        nt, nj, kind, rep = args.worker
        print(json.dumps(worker(int(nt), None if nj == "None" else int(nj), kind, int(rep))))
        return
    cores = os.cpu_count() or 1
    settings = [("1 thread", 1, None), (f"{cores} threads", cores, None),
                (f"n_jobs={cores}", cores, cores)]
    loads = [0] + ([args.load] if args.load else [])
    print(f"PEFTransformer(kind={args.kind!r}), BERT-style 17.0M parameters, examples/s "
          f"(best of {args.repeats}); ratio to the best setting of the row")
    for load in loads:
        procs = []
        if load:
            stop_at = time.time() + 3600
            procs = [multiprocessing.Process(target=_spin, args=(stop_at,), daemon=True)
                     for _ in range(load)]
            for p in procs:
                p.start()
        try:
            res = {name: _run(args, nt, nj) for name, nt, nj in settings}
        finally:
            for p in procs:
                p.terminate()
        label = "idle" if not load else f"{load} busy processes"
        for key, what in (("pef", "PEFs"), ("fwd_bwd", "fwd+bwd (peer)")):
            best = max(r[key] for r in res.values())
            cells = "  ".join(f"{name}: {r[key]:6.2f} ({r[key] / best:4.2f})"
                              for name, r in res.items())
            print(f"{label:>18} {what:>15}  {cells}", flush=True)


if __name__ == "__main__":
    main()
