"""Sphinx configuration for the kda_explained docs.

Build (warnings are errors, nitpicky cross-references)::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

myst-nb executes every notebook on every build, so a notebook that stops
running fails the build instead of rotting.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# autodoc imports the package from this checkout, and so does every notebook kernel
# (it inherits os.environ), even when the package is not installed.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _quiet_notebook_kernels() -> None:
    """Keep the kernels' start-up notices, which are not about the docs, out of the build log.

    Every notebook runs in a fresh ipykernel on this machine, whose start-up would print two
    notices that read like build problems: debugpy's warning about frozen modules (switched off
    by ``PYDEVD_DISABLE_FILE_VALIDATION``) and ipykernel's notice that its local TCP sockets are
    not encrypted (myst-nb's kernel manager provisions no CurveZMQ keys). The second is dropped
    by ``_kernel/ipython_kernel_config.py``, loaded from a profile in a throw-away IPython
    directory, so neither the user's IPython profile nor the repository is touched.
    """
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    ipython_dir = tempfile.mkdtemp(prefix="kda-docs-ipython-")
    atexit.register(shutil.rmtree, ipython_dir, ignore_errors=True)
    profile = Path(ipython_dir) / "profile_default"
    profile.mkdir()
    shutil.copy(DOCS / "_kernel" / "ipython_kernel_config.py", profile / "ipython_kernel_config.py")
    os.environ["IPYTHONDIR"] = str(profile.parent)


_quiet_notebook_kernels()


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

exclude_patterns = ["_build", "_kernel", "jupyter_execute", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- Math, rendered offline ------------------------------------------------------------------------
# The pages must show their equations without a network, so MathJax is served with the site instead
# of from a CDN: the docs extra installs MathJax 3 (the django-static-mathjax wheel holds MathJax's
# files and needs no Django), and _copy_mathjax puts what tex-mml-chtml.js loads into _static/mathjax.
mathjax_path = "mathjax/tex-mml-chtml.js"  # relative to _static

#: The parts of MathJax's es5/ folder the pages use: the component, the TeX extensions it may load
#: on demand, the CommonHTML fonts, the menu and its accessibility modules.
_MATHJAX_PARTS = ["tex-mml-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y", "sre"]


def _mathjax_es5() -> Path | None:
    """MathJax's ``es5`` folder as the ``mathjax`` package installs it, or None without it."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        return None
    es5 = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax" / "es5"
    return es5 if (es5 / "tex-mml-chtml.js").is_file() else None


def _copy_mathjax(app, exception) -> None:
    """After an HTML build, copy MathJax into ``_static/mathjax`` (``mathjax_path`` points there)."""
    if exception is not None or app.builder.format != "html":
        return
    es5 = _mathjax_es5()
    if es5 is None:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "MathJax is not installed, so the equations will not render: pip install -e '.[docs]'"
        )
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    for part in _MATHJAX_PARTS:
        src = es5 / part
        if src.is_dir():
            shutil.copytree(src, target / part, dirs_exist_ok=True)
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / part)

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
    ("py:class", "torch.autograd.function.Function"),
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
html_static_path = ["_static"]
html_css_files = ["kda.css"]  # long code lines and wide tables scroll inside the text column


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
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True}
