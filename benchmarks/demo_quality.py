"""Quality of the demo's decomposition against the reference schedule, on the same PEFs.

Reproduce (2-core machine, about a minute)::

    python benchmarks/demo_quality.py

Trains the demo's digits CNN (seeded), computes low-rank PEFs once (all 10 classes,
K = 2048), then fits 32-component LowRankNPEFF with the default schedule and with the
method's reference schedule (random init, fixed lr = 1e-3, multiplicative W step, 1500
iterations), each on two seeds, and prints for each: held-out top-16 prediction purity,
median KL ratio (top 16 held-out examples vs all 450, ||delta|| = 0.1), the fraction of
components whose KL ratio exceeds their PEF-norm ratio, iterations, final loss and seconds.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from sknpeff import GuidedPerturber, LowRankNPEFF, PEFTransformer
from sknpeff.datasets import train_digits_cnn
from sknpeff.inspection import component_summary

SCHEDULES = {
    "default": {},
    "reference (random init, lr=1e-3, MU W, 1500 it)": dict(
        init="random", learning_rate=1e-3, w_solver="mu", tol=0, max_iter=1500),
}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, split = train_digits_cnn(random_state=0)
    pef = PEFTransformer(model, kind="low_rank", n_values=2048, batch_size=128)
    pef.fit(split.X_train)
    train, test = pef.compute(split.X_train), pef.compute(split.X_test)
    print("| schedule | seed | held-out purity | median KL ratio | KL > norm | iterations "
          "| final loss | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, kw in SCHEDULES.items():
        for seed in (0, 1):
            t = time.perf_counter()
            est = LowRankNPEFF(n_components=32, n_classes=pef.n_classes_, random_state=seed,
                               **kw).fit(train.pefs)
            seconds = time.perf_counter() - t
            W = est.transform(test.pefs)
            kl = GuidedPerturber(est, model, layout=pef.layout_).kl_ratios(
                split.X_test, W, n_top=16, norms=test.norms, random_state=seed)
            summ = component_summary(W, labels=split.y_test.numpy(),
                                     predictions=test.predictions, k=16)
            print(f"| {name} | {seed} | {np.mean(summ['prediction_purity']):.3f} | "
                  f"{np.nanmedian(kl.kl_ratio):.2f} | "
                  f"{np.mean(kl.kl_ratio > kl.norm_ratio):.2f} | {est.n_iter_} | "
                  f"{est.loss_curve_[-1]:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
