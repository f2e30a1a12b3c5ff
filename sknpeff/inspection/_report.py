"""The HTML report: an overview, a sortable table of components, and each component's
top examples, on one page or (for many components) one page per component."""

from __future__ import annotations

import functools
import glob
import html
import importlib.util
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from ..utils import check_choice, check_int
from ._images import as_image_batch, png_data_uri
from ._overview import methods_table, overview_figures
from ._similarity import coefficient_cosines, pseudo_fisher_cosines
from ._summary import component_mass, component_summary, top_examples
from ._text import token_rows
from ._validation import as_1d, as_float_1d, check_W

__all__ = ["example_entries", "report"]

_TEMPLATE = "report.html.jinja"
_COMPONENT_TEMPLATE = "component_page.html.jinja"
# With pages="auto", more components than this get one page each: the index then holds
# only the overview and the table, and loads fast however many components there are.
SPLIT_ABOVE = 32
# Components listed as most similar on a component's own page.
_N_SIMILAR = 5


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


def _num(value) -> str:
    """A number for a sortable cell's ``data-v``: full precision, empty when missing."""
    if value is None or not np.isfinite(value):
        return ""
    return repr(float(value))


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
    env.filters["num"] = _num
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


def example_entries(
    W: np.ndarray,
    indices: np.ndarray,
    component: int,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    name_of=lambda value: value,
    texts: list | None = None,
) -> list[dict[str, Any]]:
    """What the page shows of each of a component's top examples.

    The one place that prepares examples for display (the template's ``render_example``
    macro draws them): a new kind of example adds its key here and its branch there.

    Parameters
    ----------
    W : ndarray of shape (n_examples, n_components)
        Coefficients.
    indices : ndarray of int
        The component's top examples, best first.
    component : int
        The component.
    images : ndarray of shape (n_examples, H, W[, C]), default=None
        Images with values in [0, 1] (from :func:`as_image_batch`).
    labels, predictions : ndarray of shape (n_examples,), default=None
        True and predicted labels.
    name_of : callable, default=identity
        Display name of a label value.
    texts : list, default=None
        Text examples (from :func:`token_rows`): per example, ``(token, explained)``
        pairs.

    Returns
    -------
    entries : list of dict
        One per example: ``rank``, ``index``, ``label``, ``prediction``, ``coefficient``,
        ``wrong`` (misclassified), ``image`` (a PNG data URI or None) and ``tokens``
        (``(token, explained)`` pairs or None).
    """
    return [
        {
            "rank": rank + 1,
            "index": int(i),
            "label": None if labels is None else name_of(labels[i]),
            "prediction": None if predictions is None else name_of(predictions[i]),
            "coefficient": W[i, component],
            "wrong": labels is not None and predictions is not None
            and labels[i] != predictions[i],
            "image": None if images is None else png_data_uri(images[i]),
            "tokens": None if texts is None else texts[i],
        }
        for rank, i in enumerate(indices)
    ]


def _similarity(W: np.ndarray, components, component_kind: str) -> tuple[np.ndarray, str]:
    if components is None:
        return coefficient_cosines(W), "cosine of coefficient columns"
    S = pseudo_fisher_cosines(components, kind=component_kind)
    if S.shape[0] != W.shape[1]:
        raise ValueError(
            f"components must have {W.shape[1]} rows (the columns of W), got {S.shape[0]}."
        )
    return S, "cosine of pseudo-Fishers"


def _own_metrics(r: int, summary: Mapping, kl, nr, extra) -> dict[str, float]:
    """This run's numbers for the methods table (names shared with the caller's)."""
    out: dict[str, float] = {"components": float(r)}
    if "label_purity" in summary:
        out["label purity"] = float(np.mean(summary["label_purity"]))
    if "prediction_purity" in summary:
        out["prediction purity"] = float(np.mean(summary["prediction_purity"]))
    for name, values in (("median KL ratio", kl), ("median PEF-norm ratio", nr)):
        if values is not None:
            finite = values[np.isfinite(values)]
            out[name] = float(np.median(finite)) if finite.size else math.nan
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise ValueError("metrics must be a dict of metric name to number.")
        for name, value in extra.items():
            try:
                out[str(name)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metrics[{name!r}] must be a number, got {value!r}.") from None
    return out


def _want_plots(overview) -> bool:
    if overview is None:
        return importlib.util.find_spec("matplotlib") is not None
    if not isinstance(overview, bool):
        raise ValueError(f"overview must be True, False or None, got {overview!r}.")
    if overview and importlib.util.find_spec("matplotlib") is None:
        raise ImportError(
            "report(overview=True) draws its figures with matplotlib, an optional "
            "dependency of sknpeff: pip install 'sknpeff[plot]' (or pass overview=None)."
        )
    return overview


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


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
    components=None,
    component_kind: str = "low_rank",
    baselines=None,
    metrics=None,
    method_name: str = "NPEFF",
    title: str = "NPEFF components",
    k: int = 16,
    label_names=None,
    pages: str = "auto",
    overview: bool | None = None,
    tokens=None,
    decode=None,
    positions=None,
) -> str:
    """Write an HTML report on every component: an overview, a sortable table, examples.

    The index page starts with an overview: a heatmap of how similar the components are
    to each other, each component's KL ratio against its PEF-norm ratio (when both are
    given), how the coefficients are distributed, and (with ``baselines``) this run's
    numbers beside other methods'. A table of the components follows; click a header to
    sort by mass, purity, KL ratio and so on. Each component then shows its top ``k``
    examples (as images when ``images`` is given; as text when ``tokens`` is given, the
    explained token highlighted) with labels and predictions
    (misclassified ones outlined in red), label and prediction purity, its KL ratio
    beside its PEF-norm ratio, the parameter tensors holding most of its mass (with
    ``top_parameters``) and the components most similar to it.

    With many components each gets its own page, in a folder beside the index named after
    it (``report.html`` -> ``report-components/component-017.html``), so the index
    loads fast: for 512 components it is the overview and the table only. Every page is
    self-contained: images are base64 ``data:`` URIs, the stylesheet and the small
    sorting script are inline, nothing is loaded from elsewhere. All text is
    HTML-escaped.

    Parameters
    ----------
    path : str or os.PathLike
        The index page to write (parent directories are created).
    W : array-like of shape (n_examples, n_components)
        Coefficients (held-out coefficients recommended), of NPEFF or of any method
        giving one coefficient per example and component.
    images : array-like, default=None
        One image per example, shaped as in :func:`plot_top_examples`.
    labels, predictions : array-like of shape (n_examples,), default=None
        True and predicted labels.
    kl_ratios : array-like of shape (n_components,), default=None
        Each component's KL ratio (e.g. from ``GuidedPerturber.kl_ratios``).
    norm_ratios : array-like of shape (n_components,), default=None
        Each component's PEF-norm ratio over the same example sets.
    top_parameters : sequence of length n_components, or dict, default=None
        Per component, a list of ``(layer name, share of component mass)`` pairs, e.g.
        ``top_parameters_by_component(est)`` (:func:`top_parameters_by_component`, which
        brings the components of a fit on randomly projected PEFs back to parameter
        space first) or :func:`top_parameters_by_layer` of each component.
    components : array-like of shape (n_components, n_params), default=None
        The components (``components_`` of the fitted estimator): the similarity
        heatmap then shows :func:`pseudo_fisher_cosines`. Without them it shows
        :func:`coefficient_cosines` of ``W``. The components of a fit on randomly
        projected PEFs (width ``d``, ``h_k ~ R g_k``) can be given as they are: ``R``
        keeps inner products on average (``E[R^T R] = I``), so their cosines
        approximate those of the ``g_k`` (to about ``1 / sqrt(d)``); give the recovered
        ones (:func:`~sknpeff.pef.recover_components`) for the cosines of those.
    component_kind : {"low_rank", "diagonal"}, default="low_rank"
        What a row of ``components`` is (see :func:`pseudo_fisher_cosines`).
    baselines : dict of str to dict of str to float, default=None
        Other methods' numbers, e.g. ``{"k-means on gradients": {"prediction purity":
        0.61}}``, shown in a table beside this run's own: ``"components"``, ``"label
        purity"`` and ``"prediction purity"`` (means over components, with labels /
        predictions), ``"median KL ratio"`` and ``"median PEF-norm ratio"`` (over finite
        values). Use these names for the same quantities; other names add columns.
    metrics : dict of str to float, default=None
        More numbers for this run's row of that table (e.g. a concept purity).
    method_name : str, default="NPEFF"
        Name of this run's row.
    title : str, default="NPEFF components"
        Page title.
    k : int, default=16
        Top examples shown per component (capped at ``n_examples``).
    label_names : sequence or dict, default=None
        Display names for label and prediction values (``label_names[value]``).
    pages : {"auto", "single", "split"}, default="auto"
        ``"single"``: everything on one page. ``"split"``: one page per component.
        ``"auto"``: split above 32 components.
    overview : bool, default=None
        Draw the overview figures (needs matplotlib). None: when matplotlib is installed.
        The methods table needs no matplotlib.
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
        The index page written.

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
    pages = check_choice(pages, "pages", ("auto", "single", "split"))
    split = pages == "split" or (pages == "auto" and r > SPLIT_ABOVE)
    component_kind = check_choice(component_kind, "component_kind", ("low_rank", "diagonal"))
    imgs = None if images is None else as_image_batch(images, n)
    texts = (None if tokens is None
             else token_rows(tokens, n, decode=decode, positions=positions))
    lab = None if labels is None else as_1d(labels, "labels", n)
    pred = None if predictions is None else as_1d(predictions, "predictions", n)
    kl = _check_ratio(kl_ratios, "kl_ratios", r)
    nr = _check_ratio(norm_ratios, "norm_ratios", r)
    tops = _check_top_parameters(top_parameters, r)
    plots_wanted = _want_plots(overview)

    def name_of(value) -> str:
        if label_names is not None:
            try:
                return label_names[value]
            except (KeyError, IndexError, TypeError):
                pass
        return value

    summary = component_summary(W, labels=lab, predictions=pred, k=k)
    methods = methods_table(
        str(method_name), _own_metrics(r, summary, kl, nr, metrics), baselines
    )
    similarity, similarity_name = _similarity(W, components, component_kind)
    mass = component_mass(W)
    idx = top_examples(W, k)

    path = os.fspath(path)
    parent, base = os.path.split(path)
    folder = os.path.splitext(base)[0] + "-components"
    width = len(str(r - 1))

    def page_name(j: int) -> str:
        return f"component-{j:0{width}d}.html"

    def href(j: int, from_index: bool) -> str:
        if not split:
            return f"#c{j}"
        name = page_name(j)
        return f"{urllib.parse.quote(folder)}/{name}" if from_index else name

    components_ctx = []
    for j in range(r):
        others = np.argsort(-similarity[j], kind="stable")
        similar = [
            {"index": int(o), "cosine": similarity[j, o], "href": href(int(o), False)}
            for o in others[others != j][:_N_SIMILAR]
        ]
        components_ctx.append(
            {
                "index": j,
                "href": href(j, True),
                "mass": mass[j],
                "mean_coefficient": summary["mean_coefficient"][j],
                "label_mode": None if lab is None else name_of(summary["label_mode"][j]),
                "label_purity": None if lab is None else summary["label_purity"][j],
                "prediction_mode": (
                    None if pred is None else name_of(summary["prediction_mode"][j])
                ),
                "prediction_purity": None if pred is None else summary["prediction_purity"][j],
                "kl_ratio": None if kl is None else kl[j],
                "norm_ratio": None if nr is None else nr[j],
                "examples": None,  # filled below, one component at a time when split
                "parameters": [
                    {
                        "name": name,
                        "percent": 100 * share,
                        "bar_px": f"{max(0.0, min(1.0, share)) * 160:.1f}",
                    }
                    for name, share in (tops[j] if tops is not None else [])
                ],
                "similar": similar,
            }
        )

    def examples_of(j: int) -> list[dict[str, Any]]:
        return example_entries(
            W, idx[j], j, images=imgs, labels=lab, predictions=pred, name_of=name_of,
            texts=texts
        )

    common = {
        "title": title,
        "n_examples": n,
        "n_components": r,
        "k": k,
        "has_labels": lab is not None,
        "has_predictions": pred is not None,
        "has_kl": kl is not None,
        "has_norm": nr is not None,
        "has_parameters": tops is not None,
        "similarity_name": similarity_name,
    }
    env = _environment()
    if not split:
        for j, c in enumerate(components_ctx):
            c["examples"] = examples_of(j)
    plots = (
        overview_figures(W, similarity, similarity_name, kl, nr) if plots_wanted else []
    )
    page = env.get_template(_TEMPLATE).render(
        **common,
        split=split,
        sortable=True,
        components=components_ctx,
        methods=methods,
        plots=plots,
    )
    if parent:
        os.makedirs(parent, exist_ok=True)
    _write(path, page)
    if split:
        out_dir = os.path.join(parent, folder)
        os.makedirs(out_dir, exist_ok=True)
        # Pages of an earlier, larger report in the same place would be stale links.
        for old in glob.glob(os.path.join(glob.escape(out_dir), "component-*.html")):
            os.remove(old)
        template = env.get_template(_COMPONENT_TEMPLATE)
        index_href = "../" + urllib.parse.quote(base)
        for j, c in enumerate(components_ctx):
            c["examples"] = examples_of(j)
            text = template.render(
                **common,
                sortable=False,
                c=c,
                index_href=index_href,
                previous_href=page_name(j - 1) if j > 0 else None,
                next_href=page_name(j + 1) if j + 1 < r else None,
            )
            c["examples"] = None  # the PNGs of one component at a time in memory
            _write(os.path.join(out_dir, page_name(j)), text)
    return path
