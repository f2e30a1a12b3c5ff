"""Tests for ``python -m sknpeff demo`` (sknpeff/__main__.py and sknpeff/_demo.py)."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sknpeff.__main__ import build_parser, main
from sknpeff._demo import (
    PAPER_KL_RATIOS,
    STAGES,
    apply_norm_floor,
    format_summary,
    random_direction_kl_ratios,
    random_set_purity,
    run_demo,
)

ROOT = Path(__file__).resolve().parents[1]
#: quick settings: the whole pipeline on a smaller problem (a few seconds)
QUICK = ["--n-components", "8", "--epochs", "10", "--n-values", "1024"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_report(path: Path, n_components: int, k: int = 16) -> str:
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    n_images = len(re.findall(r'<img src="data:image/png;base64,', text))
    assert n_images == n_components * k  # top-k held-out digits per component
    assert text.count('<section class="component"') == n_components
    assert "KL ratio" in text and "PEF-norm ratio" in text
    assert "Largest parameters by layer" in text
    assert "conv1.weight" in text or "conv2.weight" in text or "fc.weight" in text
    return text


def test_demo_cli_end_to_end(tmp_path):
    """The command line, in a fresh interpreter, with quick settings: exit code 0."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "sknpeff", "demo", "--out", str(out), *QUICK],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _check_report(out / "index.html", 8)
    stdout = proc.stdout
    for i, (_, words) in enumerate(STAGES):
        assert f"[{i + 1}/{len(STAGES)}] {words}" in stdout
    assert "random baseline (same run)" in stdout and "random directions" in stdout
    assert "Matena & Raffel" in stdout and "Verdict: NPEFF's components" in stdout
    assert "median KL ratio" in stdout and "top-16 prediction purity, held-out" in stdout
    assert "time per stage" in stdout
    median_kl = float(re.search(r"median KL ratio, held-out \(top 16 vs all 450\)\s+([0-9.]+)",
                                stdout).group(1))
    assert median_kl > 2.0
    assert str(out / "index.html") in stdout


def test_demo_quick_run_numbers(tmp_path):
    stream = io.StringIO()
    result = run_demo(tmp_path / "r", n_components=8, epochs=10, n_values=1024,
                      stream=stream)
    _check_report(Path(result.report_path), 8)
    s = result.summary
    assert s["n_components"] == 8 and s["n_heldout"] == 450 and s["n_params"] == 3818
    assert s["label_smoothing"] == 0.1 and s["norm_floor"] == 0.0
    assert s["n_floored_train"] == s["n_floored_test"] == 0 and not result.floored_test.any()
    assert "Verdict: NPEFF's components beat both random baselines" in result.table
    assert s["test_accuracy"] > 0.9
    assert s["median_kl_ratio"] > 2.0
    assert 0.6 <= s["prediction_purity"] <= 1.0
    assert 0.6 <= s["prediction_purity_train"] <= 1.0
    assert s["frac_kl_above_norm"] >= 0.75
    assert result.kl_ratios.shape == result.norm_ratios.shape == (8,)
    # the baselines of the same run: random directions and random example sets
    assert result.random_kl_ratios.shape == (8,)
    assert np.all(np.isfinite(result.random_kl_ratios))
    assert s["random_kl_ratio"] == np.median(result.random_kl_ratios)
    assert s["random_kl_ratio"] < s["median_kl_ratio"] / 2
    assert 0.1 < s["random_prediction_purity"] < 0.5 < s["prediction_purity"]
    assert s["k"] == 16 and s["n_random_sets"] == 2000
    assert result.W_test.shape == (450, 8) and np.all(result.W_test >= 0)
    assert set(result.timings) == {name for name, _ in STAGES}
    assert all(t >= 0 for t in result.timings.values())
    assert s["total_seconds"] >= sum(result.timings.values()) - 1e-6
    assert result.table in stream.getvalue()


def test_demo_quiet_prints_nothing(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "q"), "--quiet", *QUICK]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "q" / "index.html").is_file()


@pytest.mark.slow
def test_demo_default_settings(tmp_path):
    """The default run (32 components, K = 2048) beats both random baselines clearly.

    Seed 0 printed held-out purity 0.92 and median KL ratio 10.29 after 491 iterations
    (``python -m sknpeff demo``); random directions and random sets give far less.
    """
    result = run_demo(tmp_path / "default", quiet=True)
    _check_report(Path(result.report_path), 32)
    s = result.summary
    assert s["n_components"] == 32 and s["n_values"] == 2048
    assert s["test_accuracy"] >= 0.97
    assert s["prediction_purity"] >= 0.85
    assert s["prediction_purity"] >= 3 * s["random_prediction_purity"]
    assert s["median_kl_ratio"] >= 5 * max(s["random_kl_ratio"], 1.0)
    assert s["frac_kl_above_norm"] == 1.0
    assert s["total_seconds"] < 120
    assert "Verdict: NPEFF's components beat both random baselines" in result.table


_SUMMARY = {"n_params": 3818, "test_accuracy": 0.978, "n_components": 32, "n_values": 2048,
            "n_top": 16, "n_heldout": 450, "k": 16, "prediction_purity": 0.9,
            "random_prediction_purity": 0.2, "n_random_sets": 2000,
            "median_kl_ratio": 8.0, "random_kl_ratio": 0.6, "frac_kl_above_norm": 1.0,
            "median_norm_ratio": 0.4, "median_kl_ratio_top128": 3.0, "total_seconds": 12.0}


def test_summary_table_has_baselines():
    table = format_summary(_SUMMARY, {name: 1.0 for name, _ in STAGES})
    assert "this run" in table and "random baseline (same run)" in table
    assert "0.20  random sets of 16" in table and "0.60  random directions" in table
    assert "mean over 2000 draws of 16 held-out examples" in table
    assert "32/32" in table and "ceiling 3.52" in table
    paper = [line for line in table.splitlines() if "Matena & Raffel" in line]
    assert len(paper) == 1 and "arXiv 2310.04649" in paper[0]
    for _, _, value in PAPER_KL_RATIOS:
        assert f"{value:.2f}" in paper[0]
    verdict = table.splitlines()[-1]
    assert verdict == ("  Verdict: NPEFF's components beat both random baselines: median KL "
                       "ratio 8.00 vs 0.60 for random directions; held-out purity 0.90 vs "
                       "0.20 for random sets of 16; KL ratio above the PEF-norm ratio for "
                       "32/32 components.")


def test_summary_verdict_when_a_baseline_is_not_beaten():
    short = dict(_SUMMARY, median_kl_ratio=0.5, frac_kl_above_norm=31 / 32)
    verdict = format_summary(short, {}).splitlines()[-1]
    assert verdict.startswith("  Verdict: NPEFF's components do not beat the random baseline "
                              "on median KL ratio 0.50 vs 0.60 for random directions (they do "
                              "on held-out purity 0.90 vs 0.20")
    assert verdict.endswith("for 31/32 components.")
    neither = dict(short, prediction_purity=0.2)
    verdict = format_summary(neither, {}).splitlines()[-1]
    assert "they do on" not in verdict and "purity 0.20 vs 0.20" in verdict
    floored = format_summary(dict(_SUMMARY, norm_floor=0.01, n_floored_train=5,
                                  n_floored_test=2), {})
    assert "norm floor 0.01 x median" in floored and "5 train, 2 held-out" in floored


def test_random_set_purity():
    assert random_set_purity(np.zeros(30), k=5) == 1.0
    assert random_set_purity(np.arange(30), k=5) == pytest.approx(0.2)
    # two balanced classes, pairs: pure with probability 49/99, else purity 1/2
    expected = 49 / 99 + 0.5 * 50 / 99
    got = random_set_purity([0, 1] * 50, k=2, random_state=3)
    assert abs(got - expected) < 0.03
    assert got == random_set_purity([0, 1] * 50, k=2, random_state=3)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_random_direction_kl_ratios_leave_estimator_and_model_alone():
    from sknpeff.datasets import make_gated_experts
    from sknpeff.decomposition import LowRankNPEFF
    from sknpeff.pef import PEFTransformer

    model, sample, _ = make_gated_experts(random_state=0)
    X, _ = sample(200, random_state=0)
    pef = PEFTransformer(model, kind="low_rank", n_values=300).fit(X)
    est = LowRankNPEFF(n_components=4, n_classes=pef.n_classes_, max_iter=50,
                       random_state=0)
    W = est.fit_transform(pef.compute(X).pefs)
    G = est.components_.copy()
    before = [p.detach().clone() for p in model.parameters()]
    ratios = random_direction_kl_ratios(est, model, X, W, layout=pef.layout_, n_top=10,
                                        random_state=1)
    assert ratios.shape == (4,) and np.all(np.isfinite(ratios)) and np.all(ratios >= 0)
    np.testing.assert_array_equal(est.components_, G)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    again = random_direction_kl_ratios(est, model, X, W, layout=pef.layout_, n_top=10,
                                       random_state=1)
    np.testing.assert_array_equal(ratios, again)


def test_apply_norm_floor_zeroes_rows_below_floor():
    X = sp.random(6, 40, density=0.3, format="csr", random_state=0, dtype=np.float32)
    X.data = np.abs(X.data) + 0.1
    norms = np.array([1.0, 1e-7, 0.02, 3.0, 0.5, 1e-12])
    before = X.copy()
    Y, below = apply_norm_floor(X, norms, 0.05)  # median 0.26: threshold 0.013
    assert below.tolist() == [False, True, False, False, False, True]
    assert sp.issparse(Y) and Y.shape == X.shape and Y.dtype == X.dtype
    Yd, Xd = Y.toarray(), X.toarray()
    assert np.all(Yd[below] == 0) and Y[below].nnz == 0
    np.testing.assert_array_equal(Yd[~below], Xd[~below])
    assert (X != before).nnz == 0  # the input is not modified
    # an explicit reference (the training median, applied to held-out rows)
    _, below_ref = apply_norm_floor(X, norms, 0.1, reference=10.0)
    assert below_ref.tolist() == [False, True, True, False, True, True]
    # floor 0 (the default of the demo) keeps everything and copies nothing
    Z, none = apply_norm_floor(X, norms, 0.0)
    assert Z is X and not none.any()
    with pytest.raises(ValueError, match="floor"):
        apply_norm_floor(X, norms, -1.0)
    with pytest.raises(ValueError, match="norms"):
        apply_norm_floor(X, norms[:3], 0.1)


def test_demo_norm_floor_rows_get_zero_coefficients(tmp_path):
    result = run_demo(tmp_path / "f", n_components=4, epochs=3, n_values=256,
                      norm_floor=0.5, quiet=True)
    s = result.summary
    floored = result.floored_test
    assert floored.shape == (450,) and floored.sum() == s["n_floored_test"] > 0
    assert s["n_floored_train"] > 0 and s["norm_floor"] == 0.5
    assert np.all(result.W_test[floored] == 0)
    assert np.all(result.W_test[~floored].sum(axis=1) > 0)
    assert "PEFs zeroed by norm floor 0.5 x median" in result.table


def test_demo_model_is_label_smoothed():
    """The demo's training recipe keeps predictions away from certainty (why: see run_demo)."""
    from sknpeff.datasets import train_digits_cnn

    probs = {}
    for ls in (0.0, 0.1):
        model, split = train_digits_cnn(random_state=0, epochs=5, label_smoothing=ls)
        with torch.no_grad():
            probs[ls] = torch.softmax(model(split.X_train), dim=1).max(dim=1).values
    assert float(probs[0.1].median()) < 0.95 and float((probs[0.1] > 0.999).sum()) == 0
    assert float(probs[0.0].median()) > 0.99 and float((probs[0.0] > 0.999).float().mean()) > 0.1
    with pytest.raises(ValueError, match="label_smoothing"):
        train_digits_cnn(epochs=1, label_smoothing=1.0)


def test_cli_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", "--help"])
    assert exc.value.code == 0
    assert "--n-components" in capsys.readouterr().out
    assert main([]) == 2


@pytest.mark.parametrize("argv", [
    ["demo", "--n-components", "0"],
    ["demo", "--seed", "-1"],
    ["demo", "--n-values", "many"],
    ["demo", "--bogus"],
])
def test_cli_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "must be a directory" in err and str(target) in err


def test_cli_label_smoothing_out_of_range(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "r"), "--label-smoothing", "1.5"]) == 2
    assert ("label_smoothing must be a finite number >= 0.0 and < 1.0; got 1.5"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["demo", "--norm-floor", "-1"])


def test_cli_n_top_too_large(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "r"), "--n-top", "450", "--quiet",
                 "--epochs", "1", "--n-components", "2", "--n-values", "64"]) == 2
    assert "n_top must be smaller than the 450 held-out examples" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"n_components": 0}, "n_components"),
    ({"n_values": -5}, "n_values"),
    ({"epochs": 1.5}, "epochs"),
    ({"n_threads": 0}, "n_threads"),
    ({"random_state": True}, "random_state"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"norm_floor": -0.1}, "norm_floor"),
])
def test_run_demo_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path / "r", quiet=True, **kwargs)
