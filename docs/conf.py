"""Sphinx configuration for the embedkit documentation."""

from __future__ import annotations

import embedkit

project = "embedkit"
author = "embedkit maintainers"
copyright = "2026, embedkit maintainers"
release = embedkit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"embedkit {release}"
html_static_path = ["_static"]
exclude_patterns = ["_build"]
