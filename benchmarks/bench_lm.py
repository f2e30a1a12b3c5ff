"""PEF throughput of a GPT-2 model at the last token: padded batches against unpadded ones.

Reproduce (torch 2.13 CPU, transformers installed)::

    .venv/bin/python benchmarks/bench_lm.py            # ~1-2 minutes

Model: ``transformers.GPT2LMHeadModel`` from a config (2 layers, width 64, 4 heads,
vocabulary 512, SDPA attention), 96 sequences, low rank, 4 class slots (the most
probable next tokens), K = 4096, batches of 32, one intra-op thread. Settings,
interleaved (A/B/C/A/B/C...), best of ``--repeats``:

* ``unpadded``: sequences of 24 tokens, ``position="last"``;
* ``padded``: sequences of 12 to 24 tokens (lists of token ids), right-padded per
  batch with an attention mask, ``position="last_nonpad"``;
* ``padded, no Conv1D rule``: as ``padded`` with the rule of GPT-2's ``Conv1D``
  projections switched off, as before it existed: those parameters take the generic
  ``torch.func`` path, whose ``vmap`` cannot batch the SDPA mask of a padded batch
  (data-dependent control flow) and falls back to the loop over examples.

Measured 2026-11-30 (2 cores shared with other jobs, load about 10; best of 2),
examples/s (ratio to unpadded)::

    unpadded                    14.5 ex/s  (1.00 of unpadded)
    padded                      17.1 ex/s  (1.18 of unpadded)
    padded, no Conv1D rule       8.8 ex/s  (0.60 of unpadded)

Padded batches are padded to their own longest sequence (at most 24 tokens), so they can
be a little faster than the unpadded ones.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import sknpeff.pef.rules._conv1d_hf as conv1d
from sknpeff.pef import PEFTransformer, pad_token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=96)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    full = torch.randint(1, 512, (args.n, 24), generator=g)
    lengths = torch.randint(12, 25, (args.n,), generator=g).tolist()
    ragged = [full[i, :n].tolist() for i, n in enumerate(lengths)]
    common = dict(kind="low_rank", n_values=4096, n_classes=4, batch_size=32)

    def run(X, position):
        tr = PEFTransformer(model, position=position, **common).fit(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            tr.compute(X)
        return args.n / (time.perf_counter() - t0)

    rule = conv1d.duck_typed_rule
    settings = {
        "unpadded": lambda: run(full, "last"),
        "padded": lambda: run(ragged, "last_nonpad"),
        "padded, no Conv1D rule": None,
    }

    def no_rule():
        conv1d.duck_typed_rule = lambda module: None
        try:
            return run(pad_token_ids(ragged), "last_nonpad")
        finally:
            conv1d.duck_typed_rule = rule

    settings["padded, no Conv1D rule"] = no_rule
    best = dict.fromkeys(settings, 0.0)
    for _ in range(args.repeats):
        for name, fn in settings.items():
            best[name] = max(best[name], fn())
    for name, v in best.items():
        print(f"{name:24s} {v:7.1f} ex/s  ({v / best['unpadded']:.2f} of unpadded)")


if __name__ == "__main__":
    main()
