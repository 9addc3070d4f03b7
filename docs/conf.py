"""Sphinx configuration of the difflens documentation (build: ``python -m sphinx -W docs
docs/_build``).  Markdown pages via MyST, notebooks rendered without executing them (CI executes
them separately with nbmake), API reference from the numpy-style docstrings."""
import difflens

project = "difflens"
author = "the difflens developers"
copyright = "2026, the difflens developers"
release = version = getattr(difflens, "__version__", "0.1.0")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
nb_execution_mode = "off"
myst_heading_anchors = 3
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
html_theme = "alabaster"
html_title = "difflens"
html_static_path = []
