"""Command line: ``python -m sknpeff demo [--out DIR] [--seed N] [--n-components R] ...``.

``demo`` is the main job (see :func:`sknpeff._demo.run_demo`): it trains a small CNN on
scikit-learn's bundled digits, decomposes its per-example Fishers with NPEFF, perturbs the
model along every component and writes ``DIR/index.html``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _int_at_least(low: int, words: str):
    """An argparse type: an integer ``>= low``, else the error names ``words``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m sknpeff``.

    Returns
    -------
    parser : argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="python -m sknpeff",
        description="sknpeff: Non-Negative Per-Example Fisher Factorization (NPEFF).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="NPEFF of a small digits CNN, end to end, with an HTML report",
        description=(
            "Train a small CNN on scikit-learn's bundled digits, compute its low-rank "
            "per-example Fishers, fit LowRankNPEFF, fit held-out coefficients, perturb the "
            "model along every component and write DIR/index.html. Offline; about a minute "
            "on 2 CPU cores."
        ),
    )
    demo.add_argument("--out", default="npeff-report", metavar="DIR",
                      help="report directory (default: ./npeff-report)")
    demo.add_argument("--seed", type=_non_negative_int, default=0,
                      help="random seed of training, decomposition and baselines (default: 0)")
    demo.add_argument("--n-components", type=_positive_int, default=32, metavar="R",
                      help="number of NPEFF components (default: 32)")
    demo.add_argument("--n-values", type=_positive_int, default=2048, metavar="K",
                      help="entries kept per PEF (default: 2048)")
    demo.add_argument("--epochs", type=_positive_int, default=30,
                      help="training epochs of the CNN (default: 30)")
    demo.add_argument("--max-iter", type=_positive_int, default=1000,
                      help="maximum LowRankNPEFF iterations (default: 1000)")
    demo.add_argument("--n-top", type=_positive_int, default=16,
                      help="top held-out examples per component for the KL ratio "
                           "(default: 16)")
    demo.add_argument("--label-smoothing", type=_fraction, default=0.1, metavar="EPS",
                      help="label smoothing of the CNN's training loss, in [0, 1) "
                           "(default: 0.1; 0 trains a near-certain model whose tiny "
                           "Fishers give less pure, less selective components)")
    demo.add_argument("--norm-floor", type=_fraction, default=0.0, metavar="F",
                      help="zero the PEFs whose norm is below F times the median training "
                           "norm (default: 0, keep all)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="torch/BLAS threads (default: 1, fastest for this small model "
                           "and robust on a busy machine)")
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, default=None
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    status : int
        0 on success, 1 when the demo failed, 2 on a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from ._demo import run_demo

    try:
        run_demo(
            args.out,
            random_state=args.seed,
            n_components=args.n_components,
            n_values=args.n_values,
            epochs=args.epochs,
            max_iter=args.max_iter,
            n_top=args.n_top,
            label_smoothing=args.label_smoothing,
            norm_floor=args.norm_floor,
            n_threads=args.threads,
            quiet=args.quiet,
        )
    except ValueError as exc:
        print(f"{parser.prog} demo: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{parser.prog} demo: error: cannot write the report: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog} demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
