"""The options' backward in Triton (:mod:`kda_explained.fast.backward_options`), under the interpreter.

Stage 1's backward with the in-kernel gate and the beta sigmoid, and the L2 norm's backward,
each against float64 autograd through the chunked layer's PyTorch form of the same option.
``test_fast.py::test_chunk_kda_gradients`` checks them composed in ``chunk_kda``.
"""

from __future__ import annotations

import pytest
import torch

from kda_explained import chunked
from kda_explained.fast.backward_options import gate_cumsum_bwd, l2norm_bwd
from fast_cases import DEVICE, F32, assert_close
from kda_explained.numerics import gate_floor
from kda_explained.testing import rel_rms_error


@pytest.mark.parametrize("sigmoid", [False, True], ids=["beta", "beta_sigmoid"])
@pytest.mark.parametrize("gate", ["none", "softplus", "lower_bound"])
def test_gate_cumsum_bwd_matches_autograd(gate, sigmoid):
    B, T, HV, K, C = 1, 45, 2, 40, 16
    cu = torch.tensor([0, 13, 13, 45], device=DEVICE)
    gen = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)

    x, b, dG, dbeta = randn(B, T, HV, K) * 2, randn(B, T, HV), randn(B, T, HV, K), randn(B, T, HV)
    A_log, dt_bias = randn(HV) * 0.5, randn(HV, K)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, A_log, dt_bias)]
    xg, bg, Ag, biasg = leaves
    if gate == "softplus":
        g = chunked.kda_gate(xg, Ag, biasg)
    elif gate == "lower_bound":
        g = chunked.lowerbound_gate(xg, Ag, biasg, lower_bound=-4.0)
    else:
        g = xg
    beta = 2.0 * torch.sigmoid(bg) if sigmoid else bg
    G = chunked.chunk_local_cumsum(g, C, cu)
    ((G * dG).sum() + (beta * dbeta).sum()).backward()
    out = gate_cumsum_bwd(dG.float(), C, cu, g=x.float(), use_gate_in_kernel=gate != "none", A_log=A_log.float(),
                          dt_bias=dt_bias.float(), lower_bound=-4.0 if gate == "lower_bound" else None,
                          beta=b.float(), dbeta=dbeta.float(), use_beta_sigmoid_in_kernel=sigmoid, allow_neg_eigval=True)
    assert_close(out.dg, xg.grad, F32, "dg")
    if gate != "none":
        assert_close(out.dA_log, Ag.grad, F32, "dA_log")
        assert_close(out.ddt_bias, biasg.grad, F32, "ddt_bias")
    else:
        assert out.dA_log is None and out.ddt_bias is None
    if sigmoid:
        assert_close(out.dbeta, bg.grad, F32, "dbeta")
    with pytest.raises(ValueError, match="^g: "):
        gate_cumsum_bwd(dG.float(), C, cu, use_gate_in_kernel=True)


def test_l2norm_bwd_matches_autograd():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 7, 2, 48, generator=gen, dtype=torch.float64).to(DEVICE)
    x[0, 0, 0] = 0.0  # a zero row: eps keeps it finite
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    xl = x.clone().requires_grad_(True)
    (chunked.l2norm(xl) * dy).sum().backward()
    dx = l2norm_bwd(x.float(), dy.float())
    assert dx.dtype == torch.float32 and torch.isfinite(dx).all()
    assert_close(dx, xl.grad, F32, "dx")


def test_gate_backward_below_the_floor_is_the_clamps():
    """Raw gates large enough that some ``g`` fall below float32's gate floor: the gradients are those
    of the clamp at that floor (zero below it), not those of the unclamped float64 gate."""
    B, T, HV, K, C = 1, 45, 2, 40, 16
    cu = torch.tensor([0, 13, 13, 45], device=DEVICE)
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)

    x, dG, A_log, dt_bias = randn(B, T, HV, K) * 20, randn(B, T, HV, K), 1 + 0.1 * randn(HV), randn(HV, K)
    floor = gate_floor("float32")
    assert int((chunked.kda_gate(x, A_log, dt_bias) < floor).sum()) > 10  # the case is the one it names
    out = gate_cumsum_bwd(dG.float(), C, cu, g=x.float(), use_gate_in_kernel=True, A_log=A_log.float(),
                          dt_bias=dt_bias.float())
    for clamp in (False, True):
        xg, Ag, biasg = (t.clone().requires_grad_(True) for t in (x, A_log, dt_bias))
        g = chunked.kda_gate(xg, Ag, biasg)
        g = g.clamp(min=floor) if clamp else g
        (chunked.chunk_local_cumsum(g, C, cu) * dG).sum().backward()
        errors = [rel_rms_error(out.dg, xg.grad), rel_rms_error(out.dA_log, Ag.grad),
                  rel_rms_error(out.ddt_bias, biasg.grad)]
        if clamp:
            assert max(errors) < F32, errors
        else:  # the unclamped reference's gradients below the floor are what the clamp zeroes
            assert max(errors) > 100 * F32, errors
