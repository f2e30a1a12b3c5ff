"""PEFs of a ResNet-18 (11.7M parameters, 1000 classes): examples/s and peak memory.

Reproduce (2-core machine, a few minutes)::

    python benchmarks/bench_resnet18.py            # 224 x 224 inputs, 8 examples
    python benchmarks/bench_resnet18.py --size 64  # smaller inputs, faster
    python benchmarks/bench_resnet18.py --device cuda --n 256 --batch-size 32  # on a GPU

torchvision does not import beside the CPU torch 2.13.0 wheel on these machines, so the
standard ResNet-18 architecture (BasicBlocks [2, 2, 2, 2], widths 64-512, batch norm in
eval mode, 1000-way classifier; the same 11,689,512 parameters as torchvision's
``resnet18(weights=None)``) is built here. Random weights, random inputs: only speed and
memory are measured. Low-rank PEFs of the 10 most probable classes, K = 65,536 values
kept per example (one of the values of K the paper compares); the peak resident memory is read
from ``VmHWM`` in a fresh process for two numbers of examples, to show that it does not
grow with them (on a GPU also the peak of GPU memory allocated by PyTorch).

Measured 2026-11-22 on one H100 80GB HBM3 (torch 2.11.0+cu130), ``--device cuda --n 256
--batch-size 16``, 224 x 224: 108.7 ex/s (128 examples) and 114.5 ex/s (256), peak GPU
memory allocated 4662 MiB for both. The host's peak RSS, 2001 and 2322 MiB, grows with
what this script keeps: 128 more inputs are 77 MB and their PEFs (65,536 values with
int64 indices each) 101 MB; the rest of the 321 MiB was not traced. ``iter_compute``
streams without keeping either (``bench_pef.py`` shows a flat peak). On the 2-core CPU
(default command) the fourth session measured 2.24 ex/s (4 examples) and 2.29 ex/s (8),
peak RSS 1717 and 1697 MiB; the second session 2.00 ex/s with 1.68-1.71 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected) identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18(n_classes: int = 1000) -> nn.Module:
    """The ResNet-18 architecture (11,689,512 parameters with 1000 classes)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes)]
    return nn.Sequential(*layers)


def run(n: int, size: int, batch_size: int, device: str = "cpu") -> dict:
    from sknpeff import PEFTransformer

    torch.manual_seed(0)
    model = resnet18().eval().to(device)
    X = torch.randn(n, 3, size, size)  # on the host, as a user's data: batches travel
    pef = PEFTransformer(model, kind="low_rank", n_values=65536, n_classes=10,
                         batch_size=batch_size)
    pef.fit(X[:1])
    pef.compute(X[:batch_size])  # warm-up (CUDA context, kernels, allocator)
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = pef.compute(X)
    seconds = time.perf_counter() - t
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    gpu_peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    return dict(n=n, seconds=seconds, per_s=n / seconds, peak=peak, gpu_peak=gpu_peak,
                n_params=pef.n_params_, shape=list(res.pefs.shape), nnz=int(res.pefs.nnz))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--n", type=int, default=8, help="examples in the timed run")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device of the model")
    ap.add_argument("--worker", nargs=3, type=int, metavar=("N", "SIZE", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run(*args.worker, device=args.device)))
        return
    rows = []
    for n in (args.n // 2, args.n):  # fresh process each: peak memory vs n
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), str(args.size),
                              str(args.batch_size), "--device", args.device],
                             capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gpu = args.device != "cpu"
    where = torch.cuda.get_device_name(args.device) if gpu else "CPU"
    print(f"ResNet-18, {rows[0]['n_params']:,} parameters, 1000 classes, 10 most probable, "
          f"K = 65,536, {args.size}x{args.size} inputs, batch {args.batch_size}, {where}, "
          f"torch threads {torch.get_num_threads()}")
    print("| examples | seconds | examples/s | peak RSS (fresh process) |"
          + (" peak GPU memory allocated |" if gpu else ""))
    print("|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        print(f"| {r['n']} | {r['seconds']:.1f} | {r['per_s']:.2f} | "
              f"{r['peak'] / 2**20:.0f} MiB |"
              + (f" {r['gpu_peak'] / 2**20:.0f} MiB |" if gpu else ""))


if __name__ == "__main__":
    main()
