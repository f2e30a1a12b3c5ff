"""Run every gallery script (examples/plot_*.py) and, when Sphinx is installed, the docs."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("plot_*.py"))


def _env() -> dict:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    # small models: one thread each is fastest, and robust on a busy machine
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_gallery_has_the_six_examples():
    names = {p.stem for p in EXAMPLES}
    assert {"plot_quickstart", "plot_diagonal_vs_low_rank", "plot_guided_perturbations",
            "plot_component_expansion", "plot_planted_experts",
            "plot_stability"} <= names
    for path in EXAMPLES:
        text = path.read_text(encoding="utf-8")
        # sphinx-gallery: a docstring with a title underlined by "=" first
        assert text.startswith('"""\n'), path.name
        lines = text.splitlines()
        assert set(lines[2]) == {"="} and len(lines[2]) >= len(lines[1]), path.name


def _run_example(path: Path, workdir: Path) -> tuple[int, str, str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          env=_env(), cwd=workdir, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Every script, two at a time (each uses one thread): about half the serial time."""
    root = tmp_path_factory.mktemp("examples")
    workers = max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {p.stem: pool.submit(_run_example, p, root / p.stem) for p in EXAMPLES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, example_runs):
    rc, stdout, stderr, elapsed = example_runs[path.stem]
    assert rc == 0, f"{path.name} failed:\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr
    assert stdout.strip(), f"{path.name} printed nothing"
    print(f"{path.name}: {elapsed:.1f} s")


def test_in_context_learning_recovers_the_mechanisms(example_runs):
    """The gallery's in-context learning example (one training seed): components whose
    top held-out examples share one known mechanism, and recall components whose
    perturbation moves their top examples selectively."""
    rc, stdout, stderr, _ = example_runs["plot_in_context_learning"]
    assert rc == 0, stderr
    assert float(re.search(r"mean top-example purity: ([\d.]+)", stdout)[1]) >= 0.9
    kl = float(re.search(r"median KL ratio of the recall components: ([\d.]+)", stdout)[1])
    assert kl >= 5
    for m in re.finditer(r"KL ratio ([\d.]+) \(PEF-norm ratio ([\d.]+)\)", stdout):
        assert float(m[1]) > float(m[2])


def test_class_axis_ablation(example_runs):
    """The class-axis example on planted experts with 100 classes: the eigen slots are
    exact with every slot and the smallest error of F at every budget; the fit on the
    exact PEFs is reproducible (the comparison is meaningful), with one slot the
    unbiased projection gives components closer to it than the biased truncations, and
    with 16 slots every option is at the noise floor."""
    rc, stdout, stderr, _ = example_runs["plot_class_axis"]
    assert rc == 0, stderr
    assert float(re.search(r"eigen, all 99 slots: relative error of F ([\d.e+-]+)",
                           stdout)[1]) < 1e-6
    floor = float(re.search(r"noise floor: exact, other seed: ([\d.]+)", stdout)[1])
    assert floor >= 0.9
    axes = ("top", "eigen", "sample", "project")
    rows = {}
    for m in re.finditer(r"^\s*(\d+) +((?:[\d.]+ \| [\d.]+\s*){4})$", stdout, re.M):
        vals = [float(v) for v in re.findall(r"[\d.]+", m[2])]
        rows[int(m[1])] = {a: (vals[2 * i], vals[2 * i + 1]) for i, a in enumerate(axes)}
    assert sorted(rows) == [1, 4, 16]
    for s, row in rows.items():
        assert row["eigen"][0] < row["top"][0], s
    for a in axes:  # more slots, smaller error
        assert rows[1][a][0] > rows[4][a][0] > rows[16][a][0], a
    assert rows[1]["project"][1] > max(rows[1]["top"][1], rows[1]["eigen"][1]) + 0.2
    for a in axes:
        assert rows[16][a][1] >= floor - 0.05, a


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None
                    or importlib.util.find_spec("sphinx_gallery") is None
                    or importlib.util.find_spec("numpydoc") is None,
                    reason="the docs need the docs extra: pip install -e '.[docs]'")
def test_docs_build(tmp_path):
    """The README's docs command, into a temporary directory, warnings as errors.

    The gallery scripts and the demo are not executed here (``plot_gallery=0``):
    :func:`test_example_runs` runs the scripts and ``tests/test_demo.py`` the demo; the
    real build does both and quotes the demo's output in getting_started.html.
    """
    src = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", src,
                    ignore=shutil.ignore_patterns("_build", "auto_examples", "generated"))
    env = _env()
    env["SKNPEFF_EXAMPLES_DIR"] = str(ROOT / "examples")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
         "-D", "plot_gallery=0", str(src), str(tmp_path / "html")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index.html", "getting_started.html", "method.html", "user_guide.html",
                 "api.html", "auto_examples/index.html", "auto_examples/plot_quickstart.html",
                 "demo-report/index.html"):
        assert (html / page).is_file(), page
    assert "LowRankNPEFF" in (html / "api.html").read_text(encoding="utf-8")
    method = (html / "method.html").read_text(encoding="utf-8")
    assert "arXiv 2310.04649" in method and 'class="math' in method
    # the demo's output is quoted from the build, never written into the page by hand
    started = (html / "getting_started.html").read_text(encoding="utf-8")
    assert "Not run in this build" in started and "python -m sknpeff demo" in started
