"""Quality of ``python -m sknpeff demo``: the chosen configuration vs the previous default.

Reproduce (2-core machine, about a minute; ``--more`` adds the norm-floor runs, about 35 s
more)::

    python benchmarks/demo_quality.py [--seeds 0 1 2 3 4] [--more]

Runs the whole demo (:func:`sknpeff._demo.run_demo`: training, PEFs, LowRankNPEFF with 32
components and K = 2048, held-out coefficients, guided perturbations, report) on each seed
for each configuration and prints one row per run, then per configuration the mean and the
minimum over seeds of the held-out top-16 prediction purity and of the median KL ratio (top
16 held-out examples vs all 450, ||delta|| = 0.1), the fewest components whose KL ratio
exceeds their PEF-norm ratio, and the mean seconds. Yardstick (method doc, section 8):
purity 0.90, median KL ratio 7.6, every component's KL ratio above its norm ratio, ~30 s.

Measured (seeds 0-4, 2 cores shared with other jobs, one thread):

=====================================  ===============  ===============  ========  =======
configuration                          purity mean/min  KL mean/min      KL>norm   seconds
=====================================  ===============  ===============  ========  =======
previous default (label smoothing 0)   0.830 / 0.803    6.93 / 4.91      32/32     4.1
chosen default (label smoothing 0.1)   0.936 / 0.916    10.13 / 9.67     32/32     5.6
=====================================  ===============  ===============  ========  =======

Seeds 5-9 (not used to choose): 0.812 / 0.775, 8.46 / 5.92 without label smoothing; 0.944 /
0.926, 9.66 / 9.30 with it. A norm floor on the unsmoothed model trades purity for KL ratio
(floor 0.001 / 0.01 / 0.1 of the median: purity 0.79 / 0.76 / 0.69, KL ratio 8.1 / 11.4 /
13.3): the near-certain digits it removes are exactly the ones whose components were pure.
The chosen default is slower because its fit runs longer (the loss of the smoothed model's
PEFs settles later: seed 0 converges after 521 iterations, so the demo allows 1000);
1500 iterations at tol 1e-6 gave the same numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import numpy as np

from sknpeff._demo import YARDSTICK, run_demo

CONFIGS = {
    "previous default (label smoothing 0)": dict(label_smoothing=0.0),
    "chosen default (label smoothing 0.1)": dict(),
}
MORE = {
    "label smoothing 0 + norm floor 0.01": dict(label_smoothing=0.0, norm_floor=0.01),
    "label smoothing 0 + norm floor 0.1": dict(label_smoothing=0.0, norm_floor=0.1),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--more", action="store_true", help="also the norm-floor runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    configs = dict(CONFIGS, **(MORE if args.more else {}))
    rows: dict[str, list[dict]] = {name: [] for name in configs}
    print("| configuration | seed | accuracy | purity (held-out) | purity (train) "
          "| median KL ratio | KL > norm | zeroed | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in configs.items():
            for seed in args.seeds:
                s = run_demo(tmp, random_state=seed, quiet=True, **kw).summary
                rows[name].append(s)
                print(f"| {name} | {seed} | {s['test_accuracy']:.3f} | "
                      f"{s['prediction_purity']:.3f} | {s['prediction_purity_train']:.3f} | "
                      f"{s['median_kl_ratio']:.2f} | "
                      f"{round(s['frac_kl_above_norm'] * s['n_components'])}"
                      f"/{int(s['n_components'])} | "
                      f"{int(s['n_floored_train'])}+{int(s['n_floored_test'])} | "
                      f"{s['total_seconds']:.1f} |", flush=True)
    y = YARDSTICK
    print()
    print(f"| configuration (seeds {' '.join(map(str, args.seeds))}) | purity mean / min "
          "| median KL ratio mean / min | KL > norm (fewest) | seconds (mean) |")
    print("|---|---|---|---|---|")
    for name, ss in rows.items():
        pur = np.array([s["prediction_purity"] for s in ss])
        kl = np.array([s["median_kl_ratio"] for s in ss])
        above = min(round(s["frac_kl_above_norm"] * s["n_components"]) for s in ss)
        secs = np.mean([s["total_seconds"] for s in ss])
        print(f"| {name} | {pur.mean():.3f} / {pur.min():.3f} | {kl.mean():.2f} / "
              f"{kl.min():.2f} | {above}/{int(ss[0]['n_components'])} | {secs:.1f} |")
    print(f"| yardstick (method doc, section 8) | {y['prediction_purity']:.2f} | "
          f"{y['median_kl_ratio']:.1f} | all | ~{y['total_seconds']:.0f} |")


if __name__ == "__main__":
    main()
