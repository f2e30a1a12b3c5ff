"""How fast the HTML report of 512 components opens in headless Chromium.

Reproduce (from the repository root; about a minute on 2 cores):

    .venv/bin/python benchmarks/bench_report.py
    .venv/bin/python benchmarks/bench_report.py --components 512 --repeats 7

Data: the 1797 scikit-learn digits as images; a planted coefficient matrix (each
component loads on a random tenth of the examples), random KL and PEF-norm ratios, random
low-rank components (for the similarity heatmap) and one baseline's numbers, as
``report`` receives them after a real fit; top 16 examples per component (as in the paper,
which used 512 components).

Measured in the same run, interleaved A/B/A/B so that load on a shared machine hits both:

* A: the index of the report with one page per component (``pages="auto"``, the default
  above 32 components): overview figures and the sortable table;
* B (named peer): the same report on a single page (``pages="single"``), every
  component's examples inline;
* one component's own page.

Load time is the page's own Navigation Timing ``loadEventStart`` (milliseconds from the
start of navigation to the load event) in headless Chromium, so the browser's start-up is
left out; its median over ``--repeats`` loads is printed, with the page sizes and how long
writing each report took.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn.datasets import load_digits  # noqa: E402

from sknpeff.inspection import report  # noqa: E402
from tests._browser import find_chromium, load_timing  # noqa: E402


def _inputs(r: int, seed: int = 0) -> dict:
    digits = load_digits()
    n = digits.images.shape[0]
    rng = np.random.default_rng(seed)
    W = 0.02 * rng.random((n, r))
    for j in range(r):
        members = rng.choice(n, n // 10, replace=False)
        W[members, j] += rng.random(members.shape[0])
    predictions = digits.target.copy()
    predictions[::13] = (predictions[::13] + 1) % 10
    return {
        "W": W,
        "images": digits.images / 16.0,
        "labels": digits.target,
        "predictions": predictions,
        "kl_ratios": rng.lognormal(1.5, 0.6, r),
        "norm_ratios": rng.lognormal(0.2, 0.4, r),
        "components": rng.standard_normal((r, 5000)),
        "baselines": {"k-means on gradients": {"prediction purity": 0.55}},
    }


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium/Chrome binary found (set SKNPEFF_CHROMIUM)")
        return 1
    os.environ.setdefault("MPLBACKEND", "Agg")
    inputs = _inputs(args.components)
    with tempfile.TemporaryDirectory(prefix="sknpeff-report-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        split = Path(report(tmp / "split" / "index.html", k=args.k, **inputs))
        t_split = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = Path(report(tmp / "single" / "index.html", k=args.k, pages="single",
                             **inputs))
        t_single = time.perf_counter() - t0
        page = sorted((split.parent / "index-components").iterdir())[args.components // 2]
        pages = {"split index (A)": split, "single page (B)": single, "component page": page}
        times: dict[str, list[float]] = {name: [] for name in pages}
        load_timing(chromium, split)  # warm the file cache and the browser's disk reads
        for _ in range(args.repeats):
            for name, path in pages.items():
                times[name].append(load_timing(chromium, path)[0])
        print(f"{args.components} components, top {args.k} examples each, "
              f"{inputs['W'].shape[0]} examples; median of {args.repeats} loads "
              "(Navigation Timing loadEventStart, headless Chromium)")
        print(f"  written in: split {t_split:.1f} s, single page {t_single:.1f} s")
        for name, path in pages.items():
            ms = times[name]
            print(f"  {name:<16} {_size(path):>9}  load {statistics.median(ms):7.0f} ms  "
                  f"(min {min(ms):.0f}, max {max(ms):.0f})")
        ratio = statistics.median(times["single page (B)"]) / statistics.median(
            times["split index (A)"])
        print(f"  single page / split index load time: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
