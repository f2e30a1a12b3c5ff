"""sknpeff: Non-Negative Per-Example Fisher Factorization for scikit-learn and PyTorch."""

__version__ = "0.1.0.dev0"

__all__: list[str] = []
