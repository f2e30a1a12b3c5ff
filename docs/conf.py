"""Sphinx configuration of the sknpeff documentation (builds offline).

Build: ``python -m sphinx -b html docs docs/_build/html`` (after
``pip install -e ".[docs]"``). The gallery (``examples/plot_*.py``) is executed by
sphinx-gallery during the build.
"""

import os
import re
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


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_attributes, priority=400)


# -- HTML --------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"sknpeff {release}"
html_static_path = ["_static"]
html_theme_options = {
    "description": "Non-Negative Per-Example Fisher Factorization for scikit-learn",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
