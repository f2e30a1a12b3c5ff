"""Tests for sknpeff.inspection."""

import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sknpeff.inspection import (
    coefficient_cosines,
    component_mass,
    component_similarity,
    component_summary,
    plot_coefficient_distribution,
    plot_coefficients,
    plot_component_similarity,
    plot_kl_ratios,
    plot_top_examples,
    pseudo_fisher_cosines,
    report,
    top_examples,
    top_parameters_by_layer,
)
from sknpeff.inspection._images import as_image_batch, png_bytes

from ._browser import count_decoded_images, dump_dom_with, find_chromium, screenshot

# ------------------------------------------------------------------------------------------
# top_examples
# ------------------------------------------------------------------------------------------


def test_top_examples_order():
    rng = np.random.default_rng(0)
    W = rng.random((50, 4))
    W_copy = W.copy()
    idx = top_examples(W, k=10)
    assert idx.shape == (4, 10) and idx.dtype == np.int64
    for j in range(4):
        vals = W[idx[j], j]
        assert np.all(np.diff(vals) <= 0)
        assert set(idx[j]) == set(np.argsort(-W[:, j])[:10])
    np.testing.assert_array_equal(W, W_copy)  # input untouched


def test_top_examples_ties_and_full():
    W = np.array([[1.0], [2.0], [2.0], [0.0]])
    np.testing.assert_array_equal(top_examples(W, k=4), [[1, 2, 0, 3]])


@pytest.mark.parametrize(
    "W, k, match",
    [
        (np.ones((5, 2)), 0, "k must"),
        (np.ones((5, 2)), 6, "k must"),
        (np.ones((5, 2)), 2.5, "k must"),
        (np.ones(5), 2, "2D"),
        (np.array([[np.nan, 1.0]]), 1, "NaN"),
    ],
)
def test_top_examples_bad_input(W, k, match):
    with pytest.raises(ValueError, match=match):
        top_examples(W, k=k)


# ------------------------------------------------------------------------------------------
# component_summary
# ------------------------------------------------------------------------------------------


def test_component_summary_constructed_case():
    # Component 0's top 4: examples 0-3; component 1's top 4: examples 4-7.
    W = np.zeros((10, 2))
    W[:4, 0] = [4, 3, 2, 1]
    W[4:8, 1] = [4, 3, 2, 1]
    W[8:, :] = 0.1
    labels = np.array([7, 7, 7, 2, 5, 5, 6, 6, 0, 0])
    predictions = np.array([7, 7, 7, 7, 5, 1, 6, 6, 0, 0])
    norms = np.array([2.0, 2, 2, 2, 0, 0, 0, 0, 1, 1])
    s = component_summary(W, labels=labels, predictions=predictions, norms=norms, k=4)
    np.testing.assert_array_equal(s["component"], [0, 1])
    np.testing.assert_array_equal(s["label_mode"], [7, 5])  # tie 5/6 -> smallest
    np.testing.assert_allclose(s["label_purity"], [0.75, 0.5])
    np.testing.assert_array_equal(s["prediction_mode"], [7, 6])
    np.testing.assert_allclose(s["prediction_purity"], [1.0, 0.5])
    np.testing.assert_allclose(s["top_accuracy"], [0.75, 0.75])
    np.testing.assert_allclose(s["top_mean_norm"], [2.0, 0.0])
    np.testing.assert_allclose(s["norm_ratio"], [2.0 / 1.0, 0.0])
    np.testing.assert_allclose(s["mean_coefficient"], [1.02, 1.02])
    np.testing.assert_allclose(s["top_mean_coefficient"], [2.5, 2.5])
    assert all(v.shape == (2,) for v in s.values())


def test_component_summary_optional_keys_and_strings():
    W = np.eye(3)
    s = component_summary(W, k=1)
    assert set(s) == {"component", "mean_coefficient", "top_mean_coefficient"}
    s = component_summary(W, labels=["cat", "dog", "cat"], k=1)
    assert list(s["label_mode"]) == ["cat", "dog", "cat"]
    with pytest.raises(ValueError, match="labels"):
        component_summary(W, labels=[1, 2], k=1)
    with pytest.raises(ValueError, match="norms"):
        component_summary(W, norms=[1.0, -1.0, 0.0], k=1)


# ------------------------------------------------------------------------------------------
# component_similarity
# ------------------------------------------------------------------------------------------


def test_component_similarity_properties():
    rng = np.random.default_rng(0)
    A = rng.random((40, 5))
    B = rng.random((40, 7))
    assert component_similarity(A, A) == pytest.approx(1.0, abs=1e-12)
    s_ab, ab, ba = component_similarity(A, B, return_directed=True)
    s_ba, ba2, ab2 = component_similarity(B, A, return_directed=True)
    assert s_ab == pytest.approx(s_ba, abs=1e-15)
    assert ab == pytest.approx(ab2) and ba == pytest.approx(ba2)
    assert s_ab == pytest.approx((ab + ba) / 2)
    perm_a, perm_b = rng.permutation(5), rng.permutation(7)
    assert component_similarity(A[:, perm_a], B[:, perm_b]) == pytest.approx(s_ab)
    assert component_similarity(A, A[:, perm_a]) == pytest.approx(1.0)
    assert 0 <= s_ab <= 1
    # Scaling a column does not change cosines.
    assert component_similarity(A * np.arange(1, 6), B) == pytest.approx(s_ab)


def test_component_similarity_hand_computed():
    A = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    B = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # cos(A0, B) = [1/sqrt2, 1, 0]; cos(A1, B) = [1/sqrt2, 0, 0]
    a_to_b = (1.0 + 1 / np.sqrt(2)) / 2
    b_to_a = (1 / np.sqrt(2) + 1.0 + 0.0) / 3
    sim, ab, ba = component_similarity(A, B, return_directed=True)
    assert ab == pytest.approx(a_to_b)
    assert ba == pytest.approx(b_to_a)
    assert sim == pytest.approx((a_to_b + b_to_a) / 2)


def test_component_similarity_zero_columns():
    A = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    sim = component_similarity(A, A)
    assert np.isfinite(sim) and sim == pytest.approx(1.0)
    B = np.array([[1.0], [2.0], [0.0]])
    sim, ab, ba = component_similarity(A, B, return_directed=True)
    assert ab == pytest.approx(0.5) and ba == pytest.approx(1.0)
    Z = np.zeros((3, 2))
    assert component_similarity(Z, Z) == 1.0
    assert component_similarity(Z, B) == 0.0


def test_component_similarity_bad_input():
    with pytest.raises(ValueError, match="same number of examples"):
        component_similarity(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="W_b"):
        component_similarity(np.ones((3, 2)), np.array([[np.inf], [1], [1]]))


# ------------------------------------------------------------------------------------------
# top_parameters_by_layer
# ------------------------------------------------------------------------------------------


def test_top_parameters_by_layer():
    layout = SimpleNamespace(
        names=("conv.weight", "conv.bias", "fc.weight"),
        offsets=(0, 6, 8),
        shapes=((2, 3), (2,), (2, 2)),
    )
    v = np.zeros(12)
    v[0] = 1.0
    v[9:11] = [2.0, 2.0]
    v[7] = 1.0
    out = top_parameters_by_layer(v, layout, k=2)
    assert [name for name, _ in out] == ["fc.weight", "conv.weight"]
    np.testing.assert_allclose([s for _, s in out], [0.8, 0.1])
    full = top_parameters_by_layer(v, layout, k=10)
    assert len(full) == 3 and sum(s for _, s in full) == pytest.approx(1.0)
    lin = top_parameters_by_layer(v, layout, k=1, squared=False)
    assert lin == [("fc.weight", pytest.approx(4 / 6))]
    assert all(s == 0.0 for _, s in top_parameters_by_layer(np.zeros(12), layout))
    with pytest.raises(ValueError, match="component_vector"):
        top_parameters_by_layer(np.zeros(11), layout)
    with pytest.raises(ValueError, match="layout"):
        top_parameters_by_layer(v, object())
    with pytest.raises(ValueError, match="k must"):
        top_parameters_by_layer(v, layout, k=0)


def test_top_parameters_by_layer_with_parameter_layout():
    torch = pytest.importorskip("torch")
    layout_mod = pytest.importorskip("sknpeff.layout")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    layout = layout_mod.ParameterLayout.from_model(model)
    v = np.zeros(layout.n_params)
    v[layout.slice("1.weight")] = 1.0
    assert top_parameters_by_layer(v, layout, k=1) == [("1.weight", 1.0)]


# ------------------------------------------------------------------------------------------
# Images and plots
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_png_roundtrip(shape):
    mpl_image = pytest.importorskip("matplotlib.image")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=shape) / 255.0
    decoded = mpl_image.imread(io.BytesIO(png_bytes(img)), format="png")
    np.testing.assert_allclose(decoded, img, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3), (6, 5, 4)])
def test_png_pixels_exact(shape):
    """The PNG holds exactly the input rounded to 256 levels (clipped to [0, 1])."""
    from PIL import Image

    rng = np.random.default_rng(1)
    img = rng.uniform(-0.2, 1.2, size=shape)
    data = png_bytes(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    expected = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)


def test_report_template_is_package_data():
    from importlib.resources import files

    templates = files("sknpeff.inspection") / "templates"
    assert (templates / "report.html.jinja").is_file()
    assert (templates / "report.css").is_file()


def test_image_batch_layouts():
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 6, 5))
    assert as_image_batch(x).shape == (4, 6, 5)
    assert as_image_batch(rng.random((4, 3, 6, 5))).shape == (4, 6, 5, 3)
    assert as_image_batch(rng.random((4, 6, 5, 3))).shape == (4, 6, 5, 3)
    scaled = as_image_batch(x * 16.0)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert as_image_batch(np.full((2, 3, 3), 255, np.uint8)).max() == 1.0
    with pytest.raises(ValueError, match="images"):
        as_image_batch(rng.random((4, 5)))


def test_plots_smoke():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    W = rng.random((20, 3))
    ax = plot_coefficients(W)
    assert ax.get_xlabel() == "component"
    fig = plot_top_examples(rng.random((20, 1, 8, 8)), W, 1, k=5, labels=np.arange(20))
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert len(titles) == 5 and titles[0].startswith("y=")
    with pytest.raises(ValueError, match="component"):
        plot_top_examples(rng.random((20, 8, 8)), W, 3)
    plt.close("all")


# ------------------------------------------------------------------------------------------
# One run's components compared with each other; their mass
# ------------------------------------------------------------------------------------------


def _frobenius_cosine(A, B):
    na, nb = np.linalg.norm(A), np.linalg.norm(B)
    if na == 0 or nb == 0:
        return float(na == nb)
    return float((A * B).sum() / (na * nb))


def test_pseudo_fisher_cosines_against_dense_matrices(monkeypatch):
    """Cosines of the explicit matrices g gᵀ and diag(h), entry by entry."""
    from scipy import sparse

    import sknpeff.inspection._similarity as sim_mod

    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 7))
    G[2] = 0.0
    G[3] = -2.0 * G[0] + 0.1 * rng.standard_normal(7)
    ref = np.array([[_frobenius_cosine(np.outer(a, a), np.outer(b, b)) for b in G] for a in G])
    monkeypatch.setattr(sim_mod, "_GRAM_BLOCK", 3)  # several column blocks
    G_copy = G.copy()
    np.testing.assert_allclose(pseudo_fisher_cosines(G), ref, atol=1e-12)
    np.testing.assert_array_equal(G, G_copy)
    np.testing.assert_allclose(pseudo_fisher_cosines(-G), ref, atol=1e-12)  # sign-blind
    H = np.abs(G)
    ref_d = np.array([[_frobenius_cosine(np.diag(a), np.diag(b)) for b in H] for a in H])
    np.testing.assert_allclose(pseudo_fisher_cosines(H, kind="diagonal"), ref_d, atol=1e-12)
    np.testing.assert_allclose(
        pseudo_fisher_cosines(sparse.csr_matrix(H), kind="diagonal"), ref_d, atol=1e-12
    )
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(
        pseudo_fisher_cosines(torch.from_numpy(G).float()), ref, atol=1e-6
    )
    with pytest.raises(ValueError, match="kind"):
        pseudo_fisher_cosines(G, kind="full")
    with pytest.raises(ValueError, match="components"):
        pseudo_fisher_cosines(G[0])
    with pytest.raises(ValueError, match="finite"):
        pseudo_fisher_cosines(np.array([[np.nan, 1.0]]))


def test_coefficient_cosines_and_mass():
    rng = np.random.default_rng(1)
    W = rng.random((20, 4))
    W[:, 3] = 0.0
    C = coefficient_cosines(W)
    for i in range(4):
        for j in range(4):
            a, b = W[:, i], W[:, j]
            expected = 1.0 if i == j == 3 else (
                0.0 if i == 3 or j == 3 else a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            )
            assert C[i, j] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(component_mass(W), W.sum(0) / W.sum())
    assert component_mass(W).sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(component_mass(np.zeros((3, 2))), [0.0, 0.0])


def test_overview_plots_draw_their_data():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    W = rng.random((30, 5))
    S = coefficient_cosines(W)
    ax = plot_component_similarity(S, Figure().subplots(), title="t")
    np.testing.assert_allclose(ax.images[0].get_array(), S)
    assert ax.get_title() == "t"
    with pytest.raises(ValueError, match="square"):
        plot_component_similarity(S[:2], Figure().subplots())
    kl = np.array([7.6, 3.2, np.nan, 0.0, 2.0])
    nr = np.array([1.1, 0.9, 1.0, np.inf, 1.5])
    ax = plot_kl_ratios(kl, nr, Figure().subplots())
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.c_[nr, kl][[0, 1, 4]])
    assert "2 not finite" in ax.get_title()
    with pytest.raises(ValueError, match="norm_ratios"):
        plot_kl_ratios(kl, nr[:3], Figure().subplots())
    left, right = plot_coefficient_distribution(W, list(Figure().subplots(1, 2)))
    np.testing.assert_allclose(left.patches[0].get_data().values,
                               100 * np.sort(component_mass(W))[::-1])
    assert right.patches[0].get_data().values.sum() == W.size
    with pytest.raises(ValueError, match="axes"):
        plot_coefficient_distribution(W, [left])


# ------------------------------------------------------------------------------------------
# HTML report
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = 300
    images = digits.images[:n] / 16.0
    labels = digits.target[:n]
    predictions = labels.copy()
    predictions[::17] = (predictions[::17] + 1) % 10
    rng = np.random.default_rng(0)
    r, k = 4, 6
    # Component j loads on examples of digit j (plus noise).
    W = 0.05 * rng.random((n, r))
    for j in range(r):
        W[labels == j, j] += 1.0 + rng.random(int((labels == j).sum()))
    layout = SimpleNamespace(
        names=("conv1.weight", "conv1.bias", "fc.weight"),
        offsets=(0, 72, 80),
        shapes=((8, 1, 3, 3), (8,), (10, 4)),
    )
    comps = rng.standard_normal((r, 120))
    top_params = [top_parameters_by_layer(c, layout, k=3) for c in comps]
    top_params[0] = [("evil<script>alert(1)</script>", 0.5)] + top_params[0][:1]
    path = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    out = report(
        path,
        W=W,
        images=images,
        labels=labels,
        predictions=predictions,
        kl_ratios=[7.6, 3.2, np.nan, 0.0],
        norm_ratios=[1.1, 0.9, 1.0, 0.0],
        top_parameters=top_params,
        components=comps,
        baselines={"k-means <grads>": {"prediction purity": 0.25, "silhouette": 0.5}},
        metrics={"silhouette": 0.125},
        title='Digits <b>"report"</b> & friends',
        k=k,
    )
    return SimpleNamespace(
        path=Path(out), W=W, labels=labels, predictions=predictions, r=r, k=k, comps=comps
    )


def test_report_html_content(digits_report):
    text = open(digits_report.path, encoding="utf-8").read()
    r, k = digits_report.r, digits_report.k
    assert text.startswith("<!DOCTYPE html>")
    # Title escaped, injected markup escaped.
    assert "Digits &lt;b&gt;&quot;report&quot;&lt;/b&gt; &amp; friends" in text
    # The only script is the report's own table sorter; the injected one is text.
    assert text.lower().count("<script") == 1 and "sknpeffSortTable" in text
    assert "evil&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # Self-contained: every image inline, nothing external.
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert len(srcs) == r * k
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    plots = re.findall(r'<img class="plot" src="([^"]*)"', text)
    assert len(plots) == 3  # similarity, KL vs norm ratio, coefficient distribution
    assert all(s.startswith("data:image/png;base64,") for s in plots)
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<link" not in text and "@import" not in text
    # One section per component, KL and norm ratios side by side.
    assert len(re.findall(r'<section class="component" id="c\d+">', text)) == r
    assert "KL ratio <b>7.6</b> &nbsp;vs&nbsp; PEF-norm ratio <b>1.1</b>" in text
    assert "Largest parameters by layer" in text
    # The methods table: this run's means and medians beside the baseline's numbers.
    s = component_summary(digits_report.W, labels=digits_report.labels,
                          predictions=digits_report.predictions, k=k)
    methods = text.split('<table class="summary methods">')[1].split("</table>")[0]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", methods)
    assert headers == ["method", "components", "label purity", "prediction purity",
                       "median KL ratio", "median PEF-norm ratio", "silhouette"]
    rows = re.findall(r"<tr[^>]*><td class=\"name\">([^<]*)</td>\s*((?:<td>[^<]*</td>)*)",
                      methods)
    cells = {name: re.findall(r"<td>([^<]*)</td>", tds) for name, tds in rows}
    assert cells["NPEFF"] == [
        "4", f"{s['label_purity'].mean():.3g}", f"{s['prediction_purity'].mean():.3g}",
        "3.2", "0.95", "0.125",  # medians over the finite KL ratios [7.6, 3.2, 0]
    ]
    assert cells["k-means &lt;grads&gt;"] == ["&ndash;"] * 2 + ["0.25"] + ["&ndash;"] * 2 + [
        "0.5"]
    # Similar components by the cosine of pseudo-Fishers of the components passed.
    S = pseudo_fisher_cosines(digits_report.comps)
    best = int(np.argsort(-S[0], kind="stable")[1])
    sim0 = text.split('id="c0"')[1].split("</section>")[0]
    assert f'(cosine of pseudo-Fishers):\n<a href="#c{best}">{best}</a>' in sim0
    # Component 0's top examples are zeros: every caption shows y=0.
    sec0 = text.split('id="c0"')[1].split("</section>")[0]
    assert sec0.count("y=0") == k
    # Misclassified top examples are marked.
    top = top_examples(digits_report.W, k)
    n_wrong = int((digits_report.labels[top] != digits_report.predictions[top]).sum())
    assert n_wrong > 0
    assert text.count('class="ex wrong"') == n_wrong


def test_report_minimal_and_bad_input(tmp_path):
    W = np.random.default_rng(0).random((5, 2))
    out = report(tmp_path / "r.html", W=W, k=50, overview=False)
    text = open(out, encoding="utf-8").read()
    assert "<img" not in text and "top 5 examples" in text
    assert 'id="overview"' not in text  # neither figures nor a methods table
    for kwargs, match in [
        ({"pages": "many"}, "pages"),
        ({"component_kind": "full"}, "component_kind"),
        ({"overview": "yes"}, "overview"),
        ({"components": np.ones((3, 4))}, "components must have 2 rows"),
        ({"baselines": [("k-means", 0.5)]}, "baselines"),
        ({"baselines": {"k-means": 0.5}}, r"baselines\['k-means'\]"),
        ({"baselines": {"k-means": {"purity": "high"}}}, "must be a number"),
        ({"metrics": {"purity": None}}, "metrics"),
    ]:
        with pytest.raises(ValueError, match=match):
            report(tmp_path / "bad.html", W=W, **{"overview": False, **kwargs})
    assert not (tmp_path / "bad.html").exists()
    with pytest.raises(ValueError, match="kl_ratios"):
        report(tmp_path / "r.html", W=W, kl_ratios=[1.0])
    with pytest.raises(ValueError, match="top_parameters"):
        report(tmp_path / "r.html", W=W, top_parameters=[[("a", 1.0)]])
    with pytest.raises(ValueError, match="images"):
        report(tmp_path / "r.html", W=W, images=np.zeros((4, 8, 8)))


_CHROMIUM = find_chromium()


@pytest.mark.skipif(
    _CHROMIUM is None,
    reason="no Chromium/Chrome binary found (install Debian's 'chromium' or set "
    "SKNPEFF_CHROMIUM); the HTML report is not checked in a browser",
)
def test_report_renders_in_headless_browser(digits_report):
    total, decoded = count_decoded_images(_CHROMIUM, digits_report.path)
    assert total == digits_report.r * digits_report.k + 3  # examples, overview figures
    assert decoded == total
    shot = screenshot(_CHROMIUM, digits_report.path, digits_report.path.with_name("report.png"))
    with open(shot, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    print(f"report screenshot: {shot}")


def test_report_label_names_and_torch_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    W = torch.from_numpy(rng.random((12, 2)))
    labels = torch.tensor([0, 1] * 6)
    images = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = report(
        tmp_path / "r.html",
        W=W,
        images=images,
        labels=labels,
        predictions=labels,
        label_names=["<zero>", "one"],
        k=3,
        overview=False,
    )
    text = open(out, encoding="utf-8").read()
    assert "y=&lt;zero&gt;" in text or "y=one" in text
    assert "<zero>" not in text
    assert text.count("<img ") == 6


# ------------------------------------------------------------------------------------------
# Many components: one page each, a sortable index
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_report(tmp_path_factory):
    """512 components (as many as the paper's largest runs), two tiny images each."""
    rng = np.random.default_rng(3)
    n, r, k = 600, 512, 2
    W = rng.random((n, r)) ** 4
    labels = rng.integers(0, 10, n)
    predictions = np.where(rng.random(n) < 0.1, (labels + 1) % 10, labels)
    kl = rng.random(r) * 10
    kl[::50] = np.nan
    folder = tmp_path_factory.mktemp("split")
    stale = folder / "index-components" / "component-999.html"
    stale.parent.mkdir()
    stale.write_text("stale")
    out = report(
        folder / "index.html",
        W=W,
        images=rng.integers(0, 256, (n, 4, 4), dtype=np.uint8),
        labels=labels,
        predictions=predictions,
        kl_ratios=kl,
        norm_ratios=rng.random(r) * 3,
        baselines={"k-means": {"prediction purity": 0.3}},
        k=k,
        overview=False,  # the figures are checked on the small report
    )
    return SimpleNamespace(path=Path(out), W=W, labels=labels, kl=kl, r=r, k=k, stale=stale)


def _hrefs(text):
    return re.findall(r'<a href="([^"]*)"', text)


def test_report_split_pages(split_report):
    index = split_report.path
    r, k = split_report.r, split_report.k
    text = index.read_text(encoding="utf-8")
    body = text.split('<table class="summary sortable" id="components">')[1]
    body = body.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == r
    # The index holds the overview and the table only: no sections, no example images.
    assert '<section class="component"' not in text and "<img" not in text
    assert "one page per component" in text and "k-means" in text
    links = _hrefs(body)
    assert len(set(links)) == r
    pages = sorted((index.parent / "index-components").iterdir())
    assert [p.name for p in pages] == [f"component-{j:03d}.html" for j in range(r)]
    assert not split_report.stale.exists()  # an earlier report's page is gone
    assert all((index.parent / link).resolve() in pages for link in links)
    top = top_examples(split_report.W, k)
    for j, page in enumerate(pages):
        html = page.read_text(encoding="utf-8")
        hrefs = _hrefs(html)
        assert (page.parent / hrefs[0]).resolve() == index.resolve()  # back to the index
        assert all((page.parent / h).resolve().is_file() for h in hrefs)
        assert len(hrefs) == 1 + (j > 0) + (j < r - 1) + 5  # index, neighbours, 5 similar
        assert html.count('<img src="data:image/png;base64,') == k
        assert re.findall(r"ex (\d+)", html) == [str(i) for i in top[j]]
        assert f"<h2>Component {j}</h2>" in html


def test_report_pages_auto_threshold(tmp_path):
    W = np.random.default_rng(0).random((40, 33))
    text = Path(report(tmp_path / "a.html", W=W[:, :32], k=2, overview=False)).read_text()
    assert text.count('<section class="component"') == 32
    assert not (tmp_path / "a-components").exists()
    text = Path(report(tmp_path / "b.html", W=W, k=2, overview=False)).read_text()
    assert '<section class="component"' not in text
    assert len(list((tmp_path / "b-components").iterdir())) == 33
    text = Path(report(tmp_path / "c.html", W=W[:, :3], pages="split", overview=False)).read_text()
    assert _hrefs(text) == [f"c-components/component-{j}.html" for j in range(3)]
    text = Path(report(tmp_path / "d.html", W=W, pages="single", overview=False)).read_text()
    assert text.count('<section class="component"') == 33
    # Names that URLs must escape: the links still lead to the files.
    from urllib.parse import unquote

    index = Path(report(tmp_path / "my report#1.html", W=W[:, :2], pages="split",
                        overview=False))
    links = _hrefs(index.read_text())
    assert links[0] == "my%20report%231-components/component-0.html"
    page = tmp_path / unquote(links[0])
    assert page.is_file()
    assert (page.parent / unquote(_hrefs(page.read_text())[0])).resolve() == index.resolve()


_SORT_PROBE = """
<script>
window.addEventListener("load", function () {
  var table = document.getElementById("components");
  var heads = table.tHead.rows[0].cells;
  function order() {
    return Array.prototype.map.call(table.tBodies[0].rows, function (row) {
      return Number(row.cells[0].getAttribute("data-v"));
    });
  }
  function click(name) {
    for (var i = 0; i < heads.length; i++) {
      if (heads[i].textContent.trim() === name) heads[i].click();
    }
  }
  var out = {};
  click("KL ratio"); out.kl = order();
  click("mass"); click("mass"); out.mass = order();
  click("label mode"); out.label = order();
  var d = document.createElement("pre");
  d.id = "sknpeff-sort";
  d.textContent = JSON.stringify(out);
  document.body.appendChild(d);
});
</script>
"""


@pytest.mark.skipif(_CHROMIUM is None, reason="no Chromium/Chrome binary found")
def test_report_table_sorts_in_headless_browser(split_report):
    import json

    dom = dump_dom_with(_CHROMIUM, split_report.path, _SORT_PROBE)
    orders = json.loads(re.search(r'<pre id="sknpeff-sort">([^<]*)</pre>', dom).group(1))
    r, kl = split_report.r, split_report.kl
    # First click on a number column: largest first, missing values last.
    assert orders["kl"] == sorted(range(r), key=lambda j: (np.isnan(kl[j]), -kl[j], j))
    # A second click reverses (the masses are distinct).
    mass = component_mass(split_report.W)
    assert orders["mass"] == sorted(range(r), key=lambda j: mass[j])
    # Text columns sort ascending; ties keep the previous order.
    modes = component_summary(split_report.W, labels=split_report.labels, k=split_report.k)
    position = {j: p for p, j in enumerate(orders["mass"])}
    assert orders["label"] == sorted(
        range(r), key=lambda j: (modes["label_mode"][j], position[j])
    )
