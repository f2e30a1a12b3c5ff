"""Docstring paragraphs both estimators state word for word, written once."""

from __future__ import annotations

import re

__all__ = ["SHARED_DOCS", "shared_doc"]

# docstring paragraphs that both estimators state word for word (see shared_doc)
SHARED_DOCS = {
    "block_size_param": """\
block_size : int, "auto" or None, default="auto"
    Parameters per column block. ``"auto"``: the backend's choice, 4096 on CPUs and
    GPUs (a block's slice of the factor stays in cache). ``None``:
    one block per partition on any backend. Blocks are always cut where they would
    hold more than 2**31 - 1 nonzeros, so that int32 indices suffice.
""",
    "coef_tol_param": """\
coef_tol : float or None, default=None
    Early stopping on coefficient stability (Matena & Raffel, arXiv 2310.04649,
    section 3.3, observed that the coefficients settle long before the loss). Every
    10 iterations the mean over components of the cosine between each column of
    ``W`` and that column 10 iterations earlier is computed; the fit stops once
    ``1 - mean cosine <= coef_tol`` at 3 checks in a row (``stop_reason_ ==
    "coef_tol"``), or earlier by ``tol``. ``None``: off. The counter restarts when a
    fit resumes from a checkpoint.
""",
    "fit_attributes": """\
reconstruction_err_ : float
    ``sqrt(loss(X, W))`` for the training ``X`` and the returned coefficients
    ``W = fit_transform(X)``, pruned parameters included, as
    :class:`sklearn.decomposition.NMF` reports it. After :meth:`partial_fit`, that of
    the last batch before its update. With float32 input the loss terms are float32
    products summed in float64: expect an absolute error near 1e-7 times the loss of
    zero coefficients.
loss_curve_ : list of float
    The objective (see :meth:`loss`) at the end of each iteration, for that
    iteration's coefficients and components, over the kept parameters (pruned ones
    add a constant that no iteration changes): one entry per iteration, the first
    after the first iteration (the initialization is not recorded), so
    ``len(loss_curve_) == n_iter_``. The coefficients returned by
    :meth:`fit_transform` are re-solved for the final components and give
    ``reconstruction_err_``. After :meth:`partial_fit`: one entry per batch, the
    batch's objective before its update.
n_iter_ : int
    Number of iterations run (after :meth:`partial_fit`: number of batches seen).
n_steps_ : int
    Number of :meth:`partial_fit` batches seen (only after :meth:`partial_fit`).
stop_reason_ : str
    Why :meth:`fit` stopped: ``"tol"`` (the loss rule), ``"coef_tol"`` (coefficient
    stability), ``"max_iter"`` or ``"interrupted"`` (Ctrl-C).
""",
    "cupy_host_attributes": """\
``backend="auto"`` computes on the input's device. The input is copied to the host
once (validation, pruning and the column blocks are host work; the blocks then go to
the devices). The fitted attributes (``components_``, ``kept_columns_``, ...) stay
NumPy whatever the input, unlike scikit-learn's convention: ``components_`` is dense
``(n_components, n_params)``, gigabytes at model scale, and is better off the device
once the fit is done; the tools that consume it (:class:`~sknpeff.GuidedPerturber`,
:class:`~sknpeff.ComponentExpander`, :mod:`sknpeff.inspection`) work on NumPy.
``cupy.asarray(est.components_)`` gives a device copy.
""",
}


def shared_doc(cls):
    """Class decorator: put each paragraph of ``SHARED_DOCS`` where the class docstring
    has a line ``{name}`` alone, indented as that line."""

    def fill(match: re.Match) -> str:
        indent = match.group(1)
        text = SHARED_DOCS[match.group(2)].rstrip("\n")
        return "\n".join(indent + line if line else line for line in text.split("\n"))

    cls.__doc__ = re.sub(r"^([ \t]*)\{(\w+)\}$", fill, cls.__doc__, flags=re.MULTILINE)
    return cls
