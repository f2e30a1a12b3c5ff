"""LowRankNPEFF on a GPU (CuPy) against the CPU backend, on the same PEF-shaped data.

Reproduce on a machine with a CUDA GPU and ``pip install 'sknpeff[cuda]'``::

    python benchmarks/gpu.py             # full size: rows = 30 000, m = 200 000, r = 64
    python benchmarks/gpu.py --quick     # 10x smaller
    python benchmarks/gpu.py --devices 0 1          # also two GPUs (one partition each)
    python benchmarks/gpu.py --cpu-only --quick     # the CPU column alone (no CuPy)
    python benchmarks/gpu.py --dry-run              # check the set-up, time nothing

Data as in ``benchmarks/bench_sparse.py``: LRM-PEF rows (``c = 3`` class slots per
example), ``K = 4096`` kept values per example, float32.

Reported:

* seconds per LowRankNPEFF iteration (W step + fused G sweep + loss), from two fits of
  different lengths so that set-up (blocking, transfer, init) cancels;
* time, GFLOP/s and achieved GB/s of the two sparse products ``A @ Ft`` and ``A.T @ R``,
  with the bytes each must move counted as values + column indices + row pointers +
  the gathered rows of the dense operand (``nnz * r`` elements) + the output; and that
  bandwidth as a share of the device's peak memory bandwidth (looked up from the device
  name read through CuPy, e.g. H100 SXM 3.35 TB/s, or computed from its memory clock
  and bus width; ``--peak-gbs`` overrides);
* GPU / CPU speed ratios for the same data: per iteration and per product.

The GPU is timed with the backend's default plan (``block_size="auto"``: 4096-column
blocks) or each ``--gpu-block-size`` given, and with the CPU's column blocks of
``--block-size`` columns, for comparison.

Without CuPy or a CUDA device the script exits with a message saying so (status 1);
``--cpu-only`` times the CPU column alone.

Measured 2026-11-22 on one H100 80GB HBM3 (CuPy 14.2, CUDA 13, 16 host cores for the CPU
column), full size, ``--repeats 3``:

    | backend                     | s / iteration | A @ Ft ms | A.T @ R ms | iteration vs CPU |
    | CPU NumpyBackend, 4096      | 0.139         | 18.6      | 38.9       | 1.0x             |
    | GPU, blocks of 4096         | 0.031         | 9.9       | 19.2       | 4.5x             |
    | GPU, one block per device   | 0.040         | 20.2      | 18.2       | 3.5x             |

``--no-cpu --gpu-block-size -1 4096 -1 4096`` (interleaved): 0.041/0.041 s per iteration
with one block, 0.031/0.033 s with 4096-column blocks, hence the default. The products
reach 17-33% of the H100's 3.35 TB/s (cuSPARSE SpMM with 64 dense columns).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse import make_pef_matrix  # noqa: E402

from sknpeff.backends import ColumnBlocks, NumpyBackend  # noqa: E402
from sknpeff.decomposition import LowRankNPEFF  # noqa: E402

#: peak memory bandwidth (GB/s) by device name fragment (vendor data sheets); the first
#: fragment found in the name wins, so longer names come first ("GH200" before "H200")
PEAK_GBS = [
    ("GH200", 4000.0), ("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0),
    ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0), ("A10", 600.0), ("V100", 900.0),
    ("T4", 320.0), ("RTX 4090", 1008.0), ("RTX 3090", 936.0),
]


def device_info(device: int) -> tuple[str, float]:
    """Name and peak memory bandwidth (GB/s) of a CUDA device, through CuPy."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    for frag, gbs in PEAK_GBS:
        if frag in name:
            return name, gbs
    clock_khz = props.get("memoryClockRate", 0)  # DDR: two transfers per clock
    bus_bits = props.get("memoryBusWidth", 0)
    return name, 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def product_bytes(nnz: int, n_out_rows: int, n_ptr: int, r: int, itemsize: int,
                  idx_size: int = 4) -> int:
    """Bytes a CSR @ dense product moves: values, indices, row pointers, the gathered
    dense rows (one r-vector per nonzero) and the output."""
    return (nnz * (itemsize + idx_size) + (n_ptr + 1) * idx_size
            + nnz * r * itemsize + n_out_rows * r * itemsize)


def lrm_input(A: sp.csr_matrix, c: int) -> sp.csr_matrix:
    """``(n * c, m)`` rows -> ``(n, c * m)`` LRM-PEF rows (the estimators' input)."""
    coo = A.tocoo()
    m = A.shape[1]
    return sp.csr_matrix((coo.data, (coo.row // c, coo.col + (coo.row % c) * m)),
                         shape=(A.shape[0] // c, c * m))


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    fn()
    sync()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def time_products(A: sp.csr_matrix, backend, block_size: int | str | None, r: int,
                  repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    Ft = rng.standard_normal((A.shape[1], r), dtype=np.float32)
    R = rng.standard_normal((A.shape[0], r), dtype=np.float32)
    blocks = ColumnBlocks(A, backend, block_size=block_size)
    parts = blocks.split_factor(Ft)
    Rd = backend.asarray(R)
    sync = backend.synchronize
    out = {"matmul": timed(lambda: blocks.matmul(parts), sync, repeats),
           "rmatmul": timed(lambda: blocks.rmatmul(Rd), sync, repeats),
           "n_blocks": len(blocks.blocks)}
    # the GPU result must be the CPU's
    ref = A @ Ft
    got = backend.to_numpy(blocks.matmul(parts))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max(), "A @ Ft differs from SciPy"
    return out


def seconds_per_iteration(X: sp.csr_matrix, c: int, r: int, iters: int, **kw) -> float:
    def loop_seconds(n: int) -> float:
        est = LowRankNPEFF(n_components=r, n_classes=c, max_iter=n, tol=0, random_state=0,
                           transform_max_iter=0, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(X)
        # the iterations alone: set-up (blocking, transfer, init) varies by seconds
        # between fits on a many-core host, more than a few iterations take
        return est._loop_seconds

    loop_seconds(2)  # warm-up: kernels compiled, memory pools filled
    return (loop_seconds(1 + iters) - loop_seconds(1)) / iters


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (``argv``: command-line arguments; default ``sys.argv``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller problem")
    ap.add_argument("--rows", type=int, default=30_000, help="rows of A (examples x c)")
    ap.add_argument("--cols", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10, help="iterations timed per fit")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--gpu-block-size", type=int, nargs="+", default=[0],
                    help="columns per GPU block, one row each; 0: the backend's default, "
                    "-1: one block per device")
    ap.add_argument("--devices", type=int, nargs="+", default=[0])
    ap.add_argument("--peak-gbs", type=float, default=None)
    ap.add_argument("--cpu-only", action="store_true", help="skip the GPU (no CuPy needed)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU column")
    ap.add_argument("--dry-run", action="store_true",
                    help="check CuPy, the devices and the problem size, then stop")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.cols = args.rows // 10, args.cols // 10
    if args.cpu_only and args.no_cpu:
        ap.error("--cpu-only and --no-cpu leave nothing to time")

    if not args.cpu_only:
        try:
            import cupy
            n_gpu = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # ImportError, or CuPy without a driver/device
            sys.exit(f"benchmarks/gpu.py needs CuPy and a CUDA GPU "
                     f"(pip install 'sknpeff[cuda]'): {exc!r}. Use --cpu-only for the CPU "
                     "column alone.")
        if n_gpu == 0:
            sys.exit("benchmarks/gpu.py: CuPy found no CUDA GPU. Use --cpu-only.")
        missing = [d for d in args.devices if not 0 <= d < n_gpu]
        if missing:
            sys.exit(f"benchmarks/gpu.py: --devices {missing} do not exist ({n_gpu} visible).")
        from sknpeff.backends._cupy import CupyBackend

    c, r = args.classes, args.r
    if args.dry_run:
        print(f"# gpu.py dry run: rows={args.rows} cols={args.cols} k={args.k} r={r}; "
              + ("CPU only" if args.cpu_only else
                 "; ".join("device {}: {}, peak {:.0f} GB/s".format(d, *device_info(d))
                           for d in args.devices)))
        return
    A = make_pef_matrix(args.rows - args.rows % c, args.cols, args.k // c)
    X = lrm_input(A, c)
    nnz = A.nnz
    flops = 2.0 * nnz * r
    bytes_mm = product_bytes(nnz, A.shape[0], A.shape[0], r, 4)
    bytes_rmm = product_bytes(nnz, A.shape[1], A.shape[1], r, 4)
    print(f"# gpu.py: rows={A.shape[0]} cols={A.shape[1]} nnz={nnz} r={r} float32; "
          f"A @ Ft moves {bytes_mm / 1e9:.2f} GB, A.T @ R {bytes_rmm / 1e9:.2f} GB")

    rows = []  # (label, peak GB/s or None, products, s/iter)
    if not args.no_cpu:
        cpu = NumpyBackend()
        prods = time_products(A, cpu, args.block_size, r, args.repeats)
        it = seconds_per_iteration(X, c, r, max(2, args.iters // 2), backend=cpu,
                                   block_size=args.block_size)
        rows.append((f"CPU NumpyBackend, blocks of {args.block_size}", None, prods, it))
    if not args.cpu_only:
        name, peak = device_info(args.devices[0])
        peak = args.peak_gbs or peak
        print(f"# device {args.devices[0]}: {name}, peak memory bandwidth {peak:.0f} GB/s")
        sizes = [None if bs == -1 else bs or "auto" for bs in args.gpu_block_size]
        if args.block_size not in sizes:  # the CPU's blocks, for comparison
            sizes.append(args.block_size)
        configs = [([args.devices[0]], bs) for bs in sizes]
        if len(args.devices) > 1:
            configs.append((list(args.devices), sizes[0]))
        for devs, bs in configs:
            be = CupyBackend(devices=devs)
            prods = time_products(A, be, bs, r, args.repeats)
            it = seconds_per_iteration(X, c, r, args.iters, backend=be, block_size=bs)
            what = ("default blocks" if bs == "auto" else "one block per device" if bs is None
                    else f"blocks of {bs}")
            rows.append((f"GPU {devs}, {what}", peak * len(devs), prods, it))

    cpu_row = rows[0] if not args.no_cpu else None
    print()
    print("| backend | s / iteration | A @ Ft ms | GFLOP/s | GB/s | % peak | A.T @ R ms "
          "| GFLOP/s | GB/s | % peak | products vs CPU | iteration vs CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, peak, p, it in rows:
        cells = [label, f"{it:.4f}"]
        for key, nbytes in (("matmul", bytes_mm), ("rmatmul", bytes_rmm)):
            t = p[key]
            bw = nbytes / t / 1e9
            cells += [f"{t * 1e3:.2f}", f"{flops / t / 1e9:.1f}", f"{bw:.0f}",
                      f"{100 * bw / peak:.0f}%" if peak else "-"]
        if cpu_row:  # speed-up: CPU time over this row's time
            base = cpu_row[2]["matmul"] + cpu_row[2]["rmatmul"]
            cells.append(f"{base / (p['matmul'] + p['rmatmul']):.1f}x")
            cells.append(f"{cpu_row[3] / it:.1f}x" if it > 0 else "-")
        else:
            cells += ["-", "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
