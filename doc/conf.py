"""Sphinx configuration for the skpadim documentation.

Build with ``sphinx-build -W -b html doc doc/_build/html`` from the repository
root. The build never touches the network: intersphinx is off, the example
gallery runs offline (make_textures and the EfficientNet-Lite0 weights come with
pip), and MathJax is only a script link in the HTML pages.
"""

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the gallery renders figures without a display

# Document the package of this checkout, also when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import skpadim  # noqa: E402
import torch  # noqa: E402

# The examples are small: one thread keeps their run time short and steady. With
# one thread per core, PyTorch's threads wait on each other at every operation,
# and on a machine whose cores are busy with other work that made the gallery
# ten times slower.
torch.set_num_threads(1)

# -- Project -----------------------------------------------------------------
project = "skpadim"
author = "the skpadim developers"
copyright = "2026, the skpadim developers"
version = skpadim.__version__
release = skpadim.__version__

# -- General -----------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_templates",
    # Sources of the gallery: sphinx-gallery turns them into auto_examples/.
    "examples",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
]
root_doc = "index"
default_role = "literal"  # `x` renders as code rather than italics
pygments_style = "sphinx"

# -- autodoc / autosummary / numpydoc ----------------------------------------
autosummary_generate = True
autodoc_typehints = "none"  # types are in the numpydoc sections
autodoc_member_order = "bysource"

# Methods are documented by the class template (autosummary), so numpydoc must
# not list them a second time.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- sphinx-gallery ------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"plot_",
    "within_subsection_order": "FileNameSortKey",
    "plot_gallery": "True",  # run every example at each build: figures are never committed
    "image_scrapers": ("matplotlib",),
    "doc_module": ("skpadim",),
    "backreferences_dir": os.path.join("generated", "backreferences"),
    "remove_config_comments": True,
    "download_all_examples": False,
    "write_computation_times": False,
    "min_reported_time": 1,
}

# -- HTML ----------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"skpadim {release}"
html_short_title = "skpadim"
html_theme_options = {
    "description": "PaDiM anomaly detection and localisation for scikit-learn",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
    "show_powered_by": False,
    "show_relbars": True,
}
html_sidebars = {
    "**": ["about.html", "navigation.html", "relations.html", "searchbox.html"],
}
html_static_path = []
html_show_sourcelink = False
html_copy_source = False
