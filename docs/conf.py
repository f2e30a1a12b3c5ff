"""Sphinx configuration of the sknpeff documentation (builds offline).

Build: ``python -m sphinx -b html docs docs/_build/html`` (after
``pip install -e ".[docs]"``). The gallery (``examples/plot_*.py``) is executed by
sphinx-gallery during the build, and so is ``python -m sknpeff demo``: its printed output
is what the getting-started page quotes, and its report is copied next to the pages (see
:func:`_run_demo`). ``-D plot_gallery=0`` skips both.
"""

import os
import re
import shutil
import subprocess
import sys
import warnings

# The gallery's models are tiny: one thread per process is fastest and robust on a busy
# machine. Set before torch / NumPy are imported (by autodoc or the gallery).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MPLBACKEND", "Agg")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import sknpeff  # noqa: E402

project = "sknpeff"
author = "the sknpeff developers"
copyright = "the sknpeff developers, BSD-3-Clause"  # noqa: A001
release = sknpeff.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
root_doc = "index"
default_role = "literal"

# -- autodoc / autosummary / numpydoc --------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"  # numpydoc sections already state the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- sphinx-gallery --------------------------------------------------------------------------
EXAMPLES_DIR = os.environ.get("SKNPEFF_EXAMPLES_DIR", os.path.join(ROOT, "examples"))
sphinx_gallery_conf = {
    "examples_dirs": [os.path.relpath(EXAMPLES_DIR, HERE)],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "min_reported_time": 1,
    "show_memory": False,
}

# the gallery scripts run as the docs are built; keep their warnings out of the log
warnings.filterwarnings("ignore", category=UserWarning, message="Matplotlib is currently")

# Docstrings write fitted attributes inside shapes, e.g. "of shape (n, n_features_in_)";
# reStructuredText reads a trailing underscore as a link. Escape it in shape expressions.
_SHAPE_ATTR = re.compile(r"(\bshape \([^)]*?\b[A-Za-z]\w*?)_(?=[,)\s])")


def _escape_shape_attributes(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        if "shape (" in line and "_" in line:
            previous = None
            while previous != line:
                previous, line = line, _SHAPE_ATTR.sub(r"\1\\_", line)
            lines[i] = line


# -- the demo's output, quoted by getting_started.rst ------------------------------------------
# Written at build time so that the quote cannot drift from what the demo prints.
DEMO_DIR = os.path.join(HERE, "_build", "demo")
DEMO_OUTPUT = os.path.join(DEMO_DIR, "output.txt")
DEMO_EXTRA = os.path.join(DEMO_DIR, "extra")  # copied to the HTML root (html_extra_path)
_SKIPPED = """\
(Not run in this build: the documentation was built with -D plot_gallery=0. A full build
runs python -m sknpeff demo and quotes its output here.)
"""


def _is_false(value) -> bool:
    return str(value).strip().lower() in ("0", "false", "no", "off", "")


def _run_demo(app):
    """Run ``python -m sknpeff demo`` (seed 0) and keep its output and its report.

    The output goes to ``DEMO_OUTPUT``, which getting_started.rst includes, with the
    absolute path of the report shortened to ``npeff-report/index.html``; the report goes
    to ``DEMO_EXTRA/demo-report/index.html``, published as ``demo-report/index.html``.
    Skipped, with a placeholder, when the gallery is not executed (``-D plot_gallery=0``).
    """
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    os.makedirs(os.path.join(DEMO_EXTRA, "demo-report"))
    if _is_false(app.config.plot_gallery):
        with open(DEMO_OUTPUT, "w", encoding="utf-8") as fh:
            fh.write(_SKIPPED)
        with open(os.path.join(DEMO_EXTRA, "demo-report", "index.html"), "w",
                  encoding="utf-8") as fh:
            fh.write("<!DOCTYPE html><title>demo report</title><p>" + _SKIPPED + "</p>\n")
        return
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "sknpeff", "demo", "--out", "npeff-report"],
                          cwd=DEMO_DIR, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m sknpeff demo failed:\n{proc.stdout}\n{proc.stderr}")
    report_dir = os.path.join(DEMO_DIR, "npeff-report")
    text = proc.stdout.replace(os.path.join(report_dir, "index.html"), "npeff-report/index.html")
    with open(DEMO_OUTPUT, "w", encoding="utf-8") as fh:
        fh.write(text)
    shutil.copy(os.path.join(report_dir, "index.html"),
                os.path.join(DEMO_EXTRA, "demo-report", "index.html"))


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_attributes, priority=400)
    app.connect("builder-inited", _run_demo)


# -- HTML --------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"sknpeff {release}"
html_static_path = ["_static"]
os.makedirs(DEMO_EXTRA, exist_ok=True)  # Sphinx checks the extra path before the build
html_extra_path = [os.path.relpath(DEMO_EXTRA, HERE)]
html_theme_options = {
    "description": "Non-Negative Per-Example Fisher Factorization for scikit-learn",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
