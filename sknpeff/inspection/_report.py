"""One self-contained HTML page describing every component, rendered from a template."""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from ..utils import check_int
from ._images import as_image_batch, png_data_uri
from ._summary import component_summary, top_examples
from ._text import token_rows
from ._validation import as_1d, as_float_1d, check_W

__all__ = ["report"]

_TEMPLATE = "report.html.jinja"


def _escape(value: Any) -> Markup:
    """HTML-escape a value as the page always has (``&quot;`` and ``&#x27;`` for quotes)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _fmt(value, digits: int = 3):
    """A number with ``digits`` significant digits (scientific from 1e4); an en dash when
    missing or not finite."""
    if value is None or not np.isfinite(value):
        return Markup("&ndash;")
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"


def _pct(value) -> str:
    return f"{value:.2f}"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        # Every {{ value }} goes through _escape, which returns markup that autoescaping
        # then leaves alone: the same escaping, with html.escape's entities.
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    env.filters["pct"] = _pct
    return env


def _check_ratio(values, name: str, r: int) -> np.ndarray | None:
    if values is None:
        return None
    return as_float_1d(values, name, r)


def _check_top_parameters(top_parameters, r: int) -> list[list[tuple[str, float]]] | None:
    if top_parameters is None:
        return None
    if isinstance(top_parameters, Mapping):
        entries = [top_parameters.get(j, []) for j in range(r)]
    else:
        if not isinstance(top_parameters, Sequence) or len(top_parameters) != r:
            raise ValueError(
                f"top_parameters must be a sequence of {r} lists of (layer name, share) "
                "pairs (one per component) or a dict keyed by component."
            )
        entries = list(top_parameters)
    checked = []
    for j, entry in enumerate(entries):
        rows = []
        for item in entry:
            try:
                name, share = item
                share = float(share)
            except (TypeError, ValueError):
                raise ValueError(
                    f"top_parameters[{j}] must hold (layer name, share) pairs, got {item!r}."
                ) from None
            rows.append((str(name), share))
        checked.append(rows)
    return checked


def report(
    path,
    *,
    W,
    images=None,
    labels=None,
    predictions=None,
    kl_ratios=None,
    norm_ratios=None,
    top_parameters=None,
    title: str = "NPEFF components",
    k: int = 16,
    label_names=None,
    tokens=None,
    decode=None,
    positions=None,
) -> str:
    """Write one self-contained HTML page describing every component.

    For each component the page shows its top ``k`` examples (as inline PNG images when
    ``images`` is given), their labels and predictions (misclassified ones outlined in
    red), or as text (when ``tokens`` is given: the example's tokens, the explained
    one highlighted), label and prediction purity, its KL ratio beside its PEF-norm ratio (when
    given), and the parameter tensors holding most of its mass (when ``top_parameters``
    is given). A summary table comes first. Images are embedded as base64 ``data:`` URIs
    and the page loads nothing else, so the single file can be mailed or archived. All
    text is HTML-escaped.

    Parameters
    ----------
    path : str or os.PathLike
        File to write (parent directories are created).
    W : array-like of shape (n_examples, n_components)
        Coefficients (held-out coefficients recommended).
    images : array-like, default=None
        One image per example, shaped as in :func:`plot_top_examples`.
    labels, predictions : array-like of shape (n_examples,), default=None
        True and predicted labels.
    kl_ratios : array-like of shape (n_components,), default=None
        Each component's KL ratio (e.g. from ``GuidedPerturber.kl_ratio``).
    norm_ratios : array-like of shape (n_components,), default=None
        Each component's PEF-norm ratio over the same example sets.
    top_parameters : sequence of length n_components, or dict, default=None
        Per component, a list of ``(layer name, share of component mass)`` pairs, e.g.
        from :func:`top_parameters_by_layer`.
    title : str, default="NPEFF components"
        Page title.
    k : int, default=16
        Top examples shown per component (capped at ``n_examples``).
    label_names : sequence or dict, default=None
        Display names for label and prediction values (``label_names[value]``).
    tokens : sequence of length n_examples, default=None
        Text examples: per example, its token strings, or its token ids (with
        ``decode``), or one string. Shown as a row of tokens with the explained
        position (``positions``) highlighted.
    decode : callable, sequence or dict, default=None
        Turns a token id into its text: ``decode(token_id)`` (e.g.
        ``lambda t: tokenizer.decode([t])``) or ``decode[token_id]`` (a vocabulary).
    positions : None, "last", int or array-like of int, default=None
        The position explained in each example (as given to ``PEFTransformer``'s
        ``position``, resolved to indices; negative from the end). ``None``: the last.

    Returns
    -------
    path : str
        The path written.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import report
    >>> rng = np.random.default_rng(0)
    >>> out = report("npeff-report/report.html", W=rng.random((30, 3)),
    ...              images=rng.random((30, 8, 8)), k=4)  # doctest: +SKIP
    """
    W = check_W(W)
    n, r = W.shape
    k = min(check_int(k, "k", low=1), n)
    imgs = None if images is None else as_image_batch(images, n)
    texts = (None if tokens is None
             else token_rows(tokens, n, decode=decode, positions=positions))
    lab = None if labels is None else as_1d(labels, "labels", n)
    pred = None if predictions is None else as_1d(predictions, "predictions", n)
    kl = _check_ratio(kl_ratios, "kl_ratios", r)
    nr = _check_ratio(norm_ratios, "norm_ratios", r)
    tops = _check_top_parameters(top_parameters, r)

    def name_of(value) -> str:
        if label_names is not None:
            try:
                return label_names[value]
            except (KeyError, IndexError, TypeError):
                pass
        return value

    summary = component_summary(W, labels=lab, predictions=pred, k=k)
    idx = top_examples(W, k)
    components = []
    for j in range(r):
        examples = [
            {
                "rank": rank + 1,
                "index": int(i),
                "label": None if lab is None else name_of(lab[i]),
                "prediction": None if pred is None else name_of(pred[i]),
                "coefficient": W[i, j],
                "wrong": lab is not None and pred is not None and lab[i] != pred[i],
                "image": None if imgs is None else png_data_uri(imgs[i]),
                "tokens": None if texts is None else texts[i],
            }
            for rank, i in enumerate(idx[j])
        ]
        parameters = [
            {
                "name": name,
                "percent": 100 * share,
                "bar_px": f"{max(0.0, min(1.0, share)) * 160:.1f}",
            }
            for name, share in (tops[j] if tops is not None else [])
        ]
        components.append(
            {
                "index": j,
                "mean_coefficient": summary["mean_coefficient"][j],
                "label_mode": None if lab is None else name_of(summary["label_mode"][j]),
                "label_purity": None if lab is None else summary["label_purity"][j],
                "prediction_mode": (
                    None if pred is None else name_of(summary["prediction_mode"][j])
                ),
                "prediction_purity": None if pred is None else summary["prediction_purity"][j],
                "kl_ratio": None if kl is None else kl[j],
                "norm_ratio": None if nr is None else nr[j],
                "examples": examples,
                "parameters": parameters,
            }
        )
    page = _environment().get_template(_TEMPLATE).render(
        title=title,
        n_examples=n,
        n_components=r,
        k=k,
        has_labels=lab is not None,
        has_predictions=pred is not None,
        has_kl=kl is not None,
        has_norm=nr is not None,
        has_parameters=tops is not None,
        components=components,
    )
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path
