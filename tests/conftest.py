"""Test set-up: the Triton interpreter on CPU-only machines, hypothesis profiles, the ``gpu`` marker.

Profiles (``HYPOTHESIS_PROFILE=dev pytest tests``):

- ``ci`` (default): few examples per property, no deadline, derandomized: every run draws the
  same examples, so a result is reproducible and a red run points at a case, not at luck; the
  naive suite runs in well under two minutes on two CPU cores.
- ``dev``: more examples, drawn afresh each run, for a longer local hunt (what it finds is pinned
  with ``@example``).
"""

import os

# First, before anything can import a kernel module: without a CUDA GPU the fast layer's Triton
# kernels run under the interpreter, which is read once, when triton is imported.
try:
    import torch
except ImportError:  # the naive layer and its tests need NumPy only
    torch = None

HAS_CUDA = torch is not None and torch.cuda.is_available()
if torch is not None and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
