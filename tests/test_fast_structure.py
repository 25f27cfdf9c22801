"""The fast layer's shape as a library: its gates beside their chunked twins, and a clear error
when the interpreter is switched on too late."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kda_explained import chunked, fast
from kda_explained.testing import TOLERANCES, rel_rms_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bias_shape", [None, "flat", "2d"])
@pytest.mark.parametrize("gate", ["kda_gate", "lowerbound_gate"])
def test_fast_gates_match_their_chunked_twins(gate, bias_shape):
    torch.manual_seed(0)
    HV, K = 3, 20
    x = 4 * torch.randn(2, 5, HV, K, device=DEVICE)
    A_log = torch.randn(HV, device=DEVICE)
    dt_bias = {None: None, "flat": torch.randn(HV * K, device=DEVICE), "2d": torch.randn(HV, K, device=DEVICE)}[bias_shape]
    kw = {"lower_bound": -3.0} if gate == "lowerbound_gate" else {}
    g = getattr(fast, gate)(x, A_log, dt_bias, **kw)
    ref = getattr(chunked, gate)(x.double(), A_log.double(), None if dt_bias is None else dt_bias.double(), **kw)
    assert g.dtype == torch.float32 and g.shape == x.shape
    assert rel_rms_error(g, ref) < TOLERANCES["fast_f32_vs_f64"]


def test_fast_gates_check_their_arguments():
    x = torch.randn(4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"^A_log: expected a tensor of shape \[HV\]"):
        fast.kda_gate(x, None)
    with pytest.raises(ValueError, match=r"^dt_bias: expected shape"):
        fast.kda_gate(x, torch.zeros(2, device=DEVICE), torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"^lower_bound: expected a finite negative number"):
        fast.lowerbound_gate(x, lower_bound=1.0)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point dtype"):
        fast.kda_gate(x.long(), torch.zeros(2, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without a GPU")
def test_interpreter_switched_on_after_import_is_a_clear_error():
    """Triton decides at import whether a kernel runs interpreted: setting TRITON_INTERPRET later
    would fail deep inside Triton ("0 active drivers"); the fast layer says what to do instead."""
    script = textwrap.dedent("""
        import os, torch
        import kda_explained.fast as fast
        os.environ["TRITON_INTERPRET"] = "1"
        q = torch.randn(1, 4, 1, 16)
        try:
            fast.chunk_kda(q, q, q, -q.abs(), torch.rand(1, 4, 1))
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "ERROR: TRITON_INTERPRET=1 was set after kda_explained.fast was imported" in out.stdout, out.stderr[-2000:]
