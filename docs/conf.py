"""Sphinx configuration for the kda_explained docs.

Build (warnings are errors, nitpicky cross-references)::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

myst-nb executes every notebook on every build, so a notebook that stops
running fails the build instead of rotting.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# autodoc imports the package from this checkout, and so does every notebook kernel
# (it inherits os.environ), even when the package is not installed.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _copy_notebooks() -> None:
    """Mirror ``notebooks/*.ipynb`` into ``docs/notebooks/`` (git-ignored).

    Sphinx only reads sources under ``docs/``; copying (not symlinking) works in any
    fresh clone on any OS. ``copy2`` keeps the mtime, so an unchanged notebook is not
    re-read by an incremental build; stale copies are removed.
    """
    src, dst = ROOT / "notebooks", DOCS / "notebooks"
    dst.mkdir(exist_ok=True)
    wanted = {p.name for p in src.glob("*.ipynb")}
    for old in dst.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for name in sorted(wanted):
        target = dst / name
        if not target.exists() or target.stat().st_mtime != (src / name).stat().st_mtime:
            shutil.copy2(src / name, target)


_copy_notebooks()

# -- Project ---------------------------------------------------------------------------------------

project = "kda_explained"
author = "kda_explained contributors"
copyright = "2025, kda_explained contributors"
release = version = "0.1.0"

extensions = [
    "myst_nb",  # Markdown pages, MyST text notebooks and .ipynb, executed at build time
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- MyST and notebook execution -------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

nb_execution_mode = "force"  # execute every notebook on every build: no cache to go stale
nb_execution_timeout = 600
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True  # and its traceback is in the log
nb_merge_streams = True

# -- autodoc ---------------------------------------------------------------------------------------

autodoc_typehints = "description"  # types under "Parameters", the signature stays short
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- Nitpicky mode ---------------------------------------------------------------------------------
# No intersphinx offline, so references to *external* types cannot resolve. Ignore exactly those,
# by full name (autodoc writes ``np.ndarray`` hints as ``numpy.ndarray``); every reference into
# kda_explained itself, and every typo, still fails the build. The torch names are for the
# chunked and fast layers' pages; ``torch.nn.modules.module.Module`` is the base class autodoc names
# for the model layer's modules (``kda_explained.layers``).
nitpicky = True
nitpick_ignore = [
    ("py:class", "numpy.ndarray"),
    ("py:class", "torch.Tensor"),
    ("py:class", "torch.dtype"),
    ("py:class", "torch.device"),
    ("py:class", "torch.nn.modules.module.Module"),
]

# -- HTML ------------------------------------------------------------------------------------------

html_theme = "alabaster"
html_title = "kda_explained"
html_theme_options = {
    "description": "Kimi Delta Attention, from the definition to the kernels",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}


# -- The tolerance table, rendered from kda_explained.testing.TOLERANCES ----------------------------

from docutils import nodes  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

#: What each key of ``TOLERANCES`` compares (docs/design.md, *Numerics*); an unknown key shows as is.
_TOLERANCE_MEANING = {
    "chunked_f64_vs_naive": "chunked, float64 inputs, vs the naive float64 reference",
    "chunked_f32_vs_naive": "chunked, float32 inputs, vs the naive float64 reference",
    "fast_f32_vs_f64": "fast, float32 inputs (IEEE float32 dots), vs a float64 reference",
    "fast_tf32_vs_f64": "fast, float32 inputs with tf32 dots, vs a float64 reference",
    "fast_bf16_output": "fast, bf16 inputs: output and final state",
    "fast_bf16_grad": "fast, bf16 inputs: gradients",
}


def _table(header: list[str], rows: list[list[nodes.Node]], widths: list[int]) -> nodes.table:
    """A plain docutils table (built as nodes: inside MyST, nested content would parse as Markdown)."""
    group = nodes.tgroup(cols=len(header))
    group += [nodes.colspec(colwidth=w) for w in widths]

    def row(cells):
        r = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", cell if isinstance(cell, nodes.Node) else nodes.Text(cell))
            r += entry
        return r

    group += nodes.thead("", row(header))
    group += nodes.tbody("", *(row(cells) for cells in rows))
    return nodes.table("", group)


class ToleranceTable(SphinxDirective):
    """``{kda-tolerances}``: the table built from the live ``TOLERANCES`` dict, so the docs never drift."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from kda_explained.testing import TOLERANCES

        rows = [
            [nodes.literal(text=key), nodes.Text(_TOLERANCE_MEANING.get(key, key)), nodes.literal(text=f"{bound:g}")]
            for key, bound in TOLERANCES.items()
        ]
        return [_table(["key", "comparison (relative RMS error)", "bound"], rows, [30, 55, 15])]


def setup(app):
    app.add_directive("kda-tolerances", ToleranceTable)
    return {"parallel_read_safe": True}
