"""Run every gallery script (examples/plot_*.py) and, when Sphinx is installed, the docs."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
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


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    print(f"{path.name}: {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None
                    or importlib.util.find_spec("sphinx_gallery") is None
                    or importlib.util.find_spec("numpydoc") is None,
                    reason="the docs need the docs extra: pip install -e '.[docs]'")
def test_docs_build(tmp_path):
    """The README's docs command, into a temporary directory, warnings as errors."""
    src = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", src,
                    ignore=shutil.ignore_patterns("_build", "auto_examples", "generated"))
    env = _env()
    env["SKNPEFF_EXAMPLES_DIR"] = str(ROOT / "examples")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
         str(src), str(tmp_path / "html")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index.html", "getting_started.html", "user_guide.html", "api.html",
                 "auto_examples/index.html", "auto_examples/plot_quickstart.html"):
        assert (html / page).is_file(), page
    assert "LowRankNPEFF" in (html / "api.html").read_text(encoding="utf-8")
