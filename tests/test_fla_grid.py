"""flash-linear-attention's KDA test grid, run against the fast layer.

``kda_explained.fast`` is a drop-in for ``fla.ops.kda``: ``chunk_kda`` and
``fused_recurrent_kda`` take the same arguments. flash-linear-attention tests its
kernels (``tests/ops/test_kda.py``) on a grid of cases: shapes (``B, T, H, HV, D``,
grouped value heads), dtypes, the in-kernel options (L2 norm, the softplus and
lower-bound gates with and without ``A_log`` / ``dt_bias``, the beta sigmoid, negative
eigenvalues, a ``[V, K]`` state), packed batches, initial states, chunk states, the
backward and a serving engine's decode step. This module runs the same grid, with
inputs drawn the way that grid draws them (``torch.rand`` queries and keys, so every
key lies in the positive orthant; ``logsigmoid`` gates scaled by
``1 / gate_logit_normalizer``; a share ``mask_p`` of gates set to ``0`` or to ``-1000``).

Each grid comes twice: at sizes the Triton interpreter runs in seconds on a CPU, and
at flash-linear-attention's own sizes, marked ``gpu`` (``pytest -m gpu``). A case's
id names its sizes and options, e.g. ``B1-T100-H1-HV2-D64-scale0.1-bf16-gate-safe_gate-disable_recompute-C32``
or ``cu0_30_50_80-H2-D64-mask0.9-fp16-gate`` (a packed batch).

The oracle is not flash-linear-attention's: every case is compared with a float64
reference (the options by their PyTorch definitions, then the chunked layer in
float64; float64 autograd for the gradients), fed the *same* rounded inputs as the
kernels, by relative RMS error within
:data:`kda_explained.testing.TOLERANCES`: ``fast_f32_vs_f64`` for float32 inputs,
``fast_bf16_output`` and ``fast_bf16_grad`` for float16 and bfloat16 inputs.

Arguments of ``fla.ops.kda`` that change nothing here (``safe_gate``,
``disable_recompute``, ``cu_seqlens_cpu``) are passed as the grid passes them. Where
the two libraries differ by design, the tests check this layer's contract:
``chunk_size=16`` is a valid chunk size here; ``return_intermediate_states`` gives
``[NC, HV, K, V]`` float32 chunk states; ``fused_recurrent_kda`` is called with
inputs that do not require grad (with such inputs it runs the differentiable chunk
pipeline, and the token-by-token kernel would go untested); the gate is tested as
stage 1 (``fast.chunk_local_cumsum`` and its backward), there being no separate gate
kernel.

The Triton interpreter casts float32 to bfloat16 by truncation where a GPU rounds to
nearest even; the fast layer keeps its intermediates (the L2-normalised q and k
included) in float32 under the interpreter, so the bf16 rows are compared on the
inputs' rounding only. The gate rows include softplus gates past the float32 floor,
whose gradient there is 0 (the forward raised them to it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
import triton

from kda_explained import chunked, fast, naive
from kda_explained.fast.backward_options import gate_cumsum_bwd
from kda_explained.numerics import gate_floor
from kda_explained.testing import TOLERANCES
import fast_cases
from fast_cases import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
F32 = TOLERANCES["fast_f32_vs_f64"]
LOW = TOLERANCES["fast_bf16_output"]
LOW_GRAD = TOLERANCES["fast_bf16_grad"]
REF_CHUNK = 64  # the float64 reference's chunk size (every size computes the same function)
SEED = 42


def bounds(dtype: str) -> Tuple[float, float]:
    """``(outputs, gradients)`` bounds for inputs of ``dtype`` (``DESIGN.md``, *Numerics*)."""
    return (F32, F32) if dtype == "fp32" else (LOW, LOW_GRAD)


# ==============================================================================================
# One case of the grid, and its readable id
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of a grid. Sizes as ``DESIGN.md`` (``K = V = D``); options named as ``fla.ops.kda`` names them.

    ``normalizer`` is the grid's ``gate_logit_normalizer`` (``g = logsigmoid(x) / normalizer``);
    ``mask_p`` the share of gates masked (to ``0``, or to ``-1000`` in the packed cases).
    """

    B: int = 1
    T: int = 64
    H: int = 1
    HV: Optional[int] = None  # None: HV = H
    D: int = 64
    scale: Optional[float] = None  # None: D ** -0.5
    normalizer: float = 1.0
    mask_p: float = 0.0
    l2norm: bool = False  # use_qk_l2norm_in_kernel
    gate: bool = False  # use_gate_in_kernel
    a_log: bool = True  # the gate has A_log (the lower-bound gate may go without)
    dt_bias: bool = True
    safe_gate: bool = False  # lower_bound = -5
    beta_sigmoid: bool = False  # use_beta_sigmoid_in_kernel
    neg_eigval: bool = False  # allow_neg_eigval
    dtype: str = "fp32"
    chunk_size: int = 64
    disable_recompute: bool = False
    cu_seqlens: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.cu_seqlens is not None:  # a packed batch: one row of all the tokens
            object.__setattr__(self, "B", 1)
            object.__setattr__(self, "T", self.cu_seqlens[-1])

    @property
    def hv(self) -> int:
        return self.H if self.HV is None else self.HV

    @property
    def lower_bound(self) -> Optional[float]:
        return -5.0 if self.safe_gate else None

    @property
    def id(self) -> str:
        if self.cu_seqlens is None:
            parts = [f"B{self.B}-T{self.T}-H{self.H}"]
        else:
            parts = ["cu" + "_".join(map(str, self.cu_seqlens)), f"H{self.H}"]
        if self.HV is not None:
            parts.append(f"HV{self.HV}")
        parts.append(f"D{self.D}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.normalizer != 1.0:
            parts.append(f"norm{self.normalizer:g}")
        if self.mask_p:
            parts.append(f"mask{self.mask_p:g}")
        flags = [("l2norm", self.l2norm), ("gate", self.gate), ("noA_log", self.gate and not self.a_log),
                 ("nobias", self.gate and not self.dt_bias), ("safe_gate", self.safe_gate),
                 ("beta_sigmoid", self.beta_sigmoid), ("neg_eigval", self.neg_eigval),
                 ("disable_recompute", self.disable_recompute)]
        parts += [self.dtype] + [name for name, on in flags if on]
        if self.chunk_size != 64:
            parts.append(f"C{self.chunk_size}")
        return "-".join(parts)


def grid(cpu: Sequence, gpu: Sequence = (), xfail: Optional[dict] = None):
    """Parametrize over ``cpu`` cases (interpreter sizes) and ``gpu`` cases (marked ``gpu``).

    ``xfail`` maps a case's id to the ``pytest.mark.xfail`` it carries.
    """
    xfail = xfail or {}
    params = [pytest.param(c, id=c.id, marks=xfail.get(c.id, ())) for c in cpu]
    params += [pytest.param(c, id="gpu-" + c.id, marks=[pytest.mark.gpu, *([xfail[c.id]] if c.id in xfail else [])])
               for c in gpu]
    return pytest.mark.parametrize("case", params)


# ==============================================================================================
# Inputs, drawn as the grid draws them
# ==============================================================================================


class Draw:
    """Random tensors from one CPU generator (seed ``SEED``), drawn in float32 then moved to :data:`DEVICE`."""

    def __init__(self, seed: int = SEED):
        self.gen = torch.Generator().manual_seed(seed)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen).to(DEVICE)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(DEVICE)

    def uniform(self, lo: float, hi: float, *shape) -> torch.Tensor:
        return lo + (hi - lo) * self.rand(*shape)


def fla_inputs(case: Case, draw: Draw, *, normal: bool = False, beta: str = "sigmoid_randn",
               A_log: str = "randn", gate_mask: float = 0.0):
    """``(q, k, v, g, beta)`` and the keyword arguments of ``case``, as the grid draws them.

    - q, k, v: ``rand`` (``randn`` with ``normal``), q and k L2-normalised here unless the kernel does it;
    - beta: ``sigmoid(randn)`` (or ``sigmoid(rand)``), or its logit with the beta sigmoid;
    - g: ``logsigmoid(randn) / normalizer`` with a share ``mask_p`` set to 0 (float32, as a model
      keeps gates), clamped to ``[-5, 0]`` under ``safe_gate``; with the in-kernel gate its raw input
      ``randn`` in ``dtype`` and ``A_log``: ``randn [HV]`` or ``log(uniform(1, 16)) [1, 1, HV, 1]``;
    - ``gate_mask``: then a share of the gates (or of the raw gate inputs) set to ``-1000``;
    - initial_state: ``randn [N, HV, D, D]`` float32.

    Every tensor is rounded to its dtype here: the reference reads these very values.
    """
    B, T, H, HV, D = case.B, case.T, case.H, case.hv, case.D
    dt = DTYPES[case.dtype]
    q, k = (draw.randn(B, T, H, D) if normal else draw.rand(B, T, H, D) for _ in range(2))
    if not case.l2norm:
        q, k = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
    v = draw.randn(B, T, HV, D) if normal else draw.rand(B, T, HV, D)
    kw = dict(scale=case.scale, use_qk_l2norm_in_kernel=case.l2norm, use_gate_in_kernel=case.gate,
              lower_bound=case.lower_bound)
    if case.gate:
        g = draw.randn(B, T, HV, D).to(dt)
        kw["A_log"] = (draw.randn(HV) if A_log == "randn" else torch.log(draw.uniform(1, 16, 1, 1, HV, 1))) \
            if case.a_log else None
        kw["dt_bias"] = draw.randn(HV * D) if case.dt_bias else None
    else:
        g = F.logsigmoid(draw.randn(B, T, HV, D)) / case.normalizer
        g = g * (draw.rand(B, T, HV, D) > case.mask_p)
    if gate_mask:
        keep = draw.rand(B, T, HV, D) > gate_mask
        g = torch.where(keep, g, torch.full_like(g, -1000.0))
    if case.safe_gate and not case.gate:
        g = g.clamp(-5, 0)
    b = torch.sigmoid(draw.randn(B, T, HV) if beta == "sigmoid_randn" else draw.rand(B, T, HV))
    if case.beta_sigmoid:
        b = torch.logit(b.clamp(1e-4, 1 - 1e-4))
        kw.update(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=case.neg_eigval)
    N = B if case.cu_seqlens is None else len(case.cu_seqlens) - 1
    kw["initial_state"] = draw.randn(N, HV, D, D)
    if case.cu_seqlens is not None:
        kw["cu_seqlens"] = torch.tensor(case.cu_seqlens, dtype=torch.int64, device=DEVICE)
    return (q.to(dt), k.to(dt), v.to(dt), g, b.to(dt)), kw


def reference(*args, chunk_size: int = REF_CHUNK, **kwargs):
    """``fast_cases.reference`` (what ``chunk_kda(...)`` computes, in float64) at the grid's chunk size."""
    return fast_cases.reference(*args, chunk_size=chunk_size, **kwargs)


#: The differentiable inputs of ``chunk_kda``, in the order of the grid's gradient checks.
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias")


def check_forward_backward(case: Case, args, kw, *, fla_kwargs=None, cotangent_seed: int = 1) -> None:
    """``chunk_kda`` on ``args, kw`` against the reference: output, final state and every gradient.

    The cotangents ``do`` (rounded to ``v``'s dtype) and ``dht`` are drawn once; the reference
    reads the same values. ``fla_kwargs`` go to ``chunk_kda`` only (its no-op arguments).
    """
    values = dict(zip(GRAD_NAMES[:5], args), **{n: kw.pop(n, None) for n in GRAD_NAMES[5:]})
    names = [n for n in GRAD_NAMES if values[n] is not None]
    leaves = {n: values[n].detach().clone().requires_grad_(True) for n in names}
    leaves64 = {n: values[n].detach().double().requires_grad_(True) for n in names}
    for n in GRAD_NAMES:
        leaves.setdefault(n, None)
        leaves64.setdefault(n, None)
    draw = Draw(cotangent_seed)
    v = args[2]
    do = draw.randn(*v.shape).to(v.dtype)
    dht = draw.randn(*values["initial_state"].shape)

    o, S = fast.chunk_kda(**leaves, **kw, output_final_state=True, chunk_size=case.chunk_size, **(fla_kwargs or {}))
    torch.autograd.backward((o, S), (do, dht))
    o_ref, S_ref = reference(**leaves64, **kw)
    torch.autograd.backward((o_ref, S_ref), (do.double(), dht.double()))

    out_bound, grad_bound = bounds(case.dtype)
    assert o.dtype == v.dtype and S.dtype == torch.float32
    assert_close(o, o_ref, out_bound, "o")
    assert_close(S, S_ref, out_bound, "ht")
    for n in names:
        assert leaves[n].grad is not None, f"d{n} is missing"
        assert leaves[n].grad.dtype == leaves[n].dtype, f"d{n}: dtype {leaves[n].grad.dtype}"
        assert_close(leaves[n].grad, leaves64[n].grad, grad_bound, f"d{n}")


def check_forward(case: Case, fn, args, kw, **extra) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fn(*args, **kw)`` (no gradients) against the reference: output and final state."""
    o, S = fn(*args, **kw, output_final_state=True, **extra)
    o_ref, S_ref = reference(*args, **kw)
    bound = bounds(case.dtype)[0]
    assert o.dtype == args[2].dtype and S.dtype == torch.float32
    assert_close(o, o_ref, bound, "o")
    assert_close(S, S_ref, bound, "ht")
    return o, S


# ==============================================================================================
# The reference itself: the chunked layer against the naive one (fla: test_naive_chunk)
# ==============================================================================================

NAIVE_CHUNK_GPU = [
    Case(1, 64, 1, 1, 64, 1.0), Case(2, 512, 3, 3, 60, 1.0), Case(4, 1024, 4, 4, 128, 0.1),
    Case(4, 1024, 4, 4, 128, 1.0, normalizer=10), Case(1, 64, 1, 2, 64, 1.0), Case(2, 512, 2, 4, 60, 1.0),
]
NAIVE_CHUNK = [
    Case(1, 64, 1, 1, 64, 1.0), Case(2, 100, 3, 3, 60, 1.0), Case(2, 80, 2, 2, 128, 0.1),
    Case(2, 80, 2, 2, 128, 1.0, normalizer=10), Case(1, 64, 1, 2, 64, 1.0), Case(2, 100, 2, 4, 60, 1.0),
]


@grid(NAIVE_CHUNK, NAIVE_CHUNK_GPU)
def test_chunked_matches_naive(case):
    (q, k, v, g, beta), kw = fla_inputs(case, Draw())
    S0 = kw["initial_state"]
    o_naive, S_naive = naive.kda(*(x.double().cpu().numpy() for x in (q, k, v, g, beta)), scale=case.scale,
                                 initial_state=S0.double().cpu().numpy(), output_final_state=True)
    for dtype, bound in ((torch.float64, TOLERANCES["chunked_f64_vs_naive"]),
                         (torch.float32, TOLERANCES["chunked_f32_vs_naive"])):
        o, S = chunked.kda(*(x.to(dtype) for x in (q, k, v, g, beta)), scale=case.scale,
                           initial_state=S0.to(dtype), output_final_state=True)
        assert_close(o, torch.as_tensor(o_naive), bound, f"o ({dtype})")
        assert_close(S, torch.as_tensor(S_naive), bound, f"ht ({dtype})")


# ==============================================================================================
# fused_recurrent_kda (fla: test_fused_recurrent, ..._use_beta_sigmoid_in_kernel,
# ..._state_v_first, ..._gate_in_kernel)
# ==============================================================================================


def poisoned(g: torch.Tensor) -> torch.Tensor:
    """``g`` in a buffer followed by ``next_power_of_2(D)`` entries of ``1e30``: a kernel that reads
    past the last channel of the last token (a ``[next_power_of_2(D)]`` tile unmasked) turns that
    read into ``inf`` or ``NaN`` in its output instead of a silent zero."""
    D = g.shape[-1]
    buf = torch.full((g.numel() + triton.next_power_of_2(D),), 1e30, dtype=g.dtype, device=g.device)
    return buf[: g.numel()].view_as(g).copy_(g)


FUSED_RECURRENT_GPU = [
    Case(1, 64, 1, 1, 64, 1.0), Case(2, 512, 3, 3, 60, 1.0), Case(3, 1000, 4, 4, 100, 0.1, l2norm=True),
    Case(4, 1024, 4, 4, 128, 0.1), Case(2, 512, 2, 4, 60, 1.0), Case(2, 1024, 2, 8, 128, 0.1, l2norm=True),
]
FUSED_RECURRENT = [
    Case(1, 64, 1, 1, 64, 1.0), Case(2, 32, 2, 2, 60, 1.0), Case(3, 24, 1, 1, 48, 0.1, l2norm=True),
    Case(2, 32, 1, 1, 64, 0.1), Case(1, 32, 2, 4, 60, 1.0), Case(1, 16, 1, 4, 64, 0.1, l2norm=True),
]


@grid(FUSED_RECURRENT, FUSED_RECURRENT_GPU)
def test_fused_recurrent(case):
    args, kw = fla_inputs(case, Draw())
    q, k, v, g, beta = args
    o, S = fast.fused_recurrent_kda(q, k, v, poisoned(g), beta, **kw, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "ht")


BETA_SIGMOID_RECURRENT_GPU = [
    Case(2, 256, 4, D=64, beta_sigmoid=True), Case(2, 256, 4, D=64, beta_sigmoid=True, neg_eigval=True),
    Case(1, 512, 3, D=60, beta_sigmoid=True, neg_eigval=True),
]
BETA_SIGMOID_RECURRENT = [
    Case(2, 32, 2, D=64, beta_sigmoid=True), Case(2, 32, 2, D=64, beta_sigmoid=True, neg_eigval=True),
    Case(1, 40, 3, D=60, beta_sigmoid=True, neg_eigval=True),
]


@grid(BETA_SIGMOID_RECURRENT, BETA_SIGMOID_RECURRENT_GPU)
def test_fused_recurrent_use_beta_sigmoid_in_kernel(case):
    # beta given as its logit: beta = sigmoid(x), or 2 sigmoid(x) with negative eigenvalues allowed
    args, kw = fla_inputs(case, Draw())
    check_forward(case, fast.fused_recurrent_kda, args, kw)


STATE_V_FIRST_RECURRENT_GPU = [
    Case(1, 64, 1, D=64, scale=1.0), Case(2, 512, 3, D=60, scale=1.0), Case(3, 1000, 4, D=100, scale=0.1),
    Case(4, 1024, 4, D=128, scale=0.1),
]
STATE_V_FIRST_RECURRENT = [
    Case(1, 64, 1, D=64, scale=1.0), Case(2, 32, 2, D=60, scale=1.0), Case(3, 24, 1, D=48, scale=0.1),
    Case(2, 32, 1, D=64, scale=0.1),
]


@grid(STATE_V_FIRST_RECURRENT, STATE_V_FIRST_RECURRENT_GPU)
def test_fused_recurrent_state_v_first(case):
    # the state as [V, K]: the same initial state, transposed, gives the same output and final state
    args, kw = fla_inputs(case, Draw())
    S0 = kw["initial_state"]
    kw_vk = dict(kw, initial_state=S0.transpose(-1, -2).contiguous(), state_v_first=True)
    o, S = fast.fused_recurrent_kda(*args, **kw_vk, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    assert S.shape == S0.shape[:2] + (case.D, case.D)
    assert_close(o, o_ref, F32, "o")
    assert_close(S.transpose(-1, -2), S_ref, F32, "ht")


GATE_RECURRENT_GPU = [
    Case(1, 64, 1, 1, 64, 1.0, l2norm=True, gate=True, dt_bias=False),
    Case(2, 256, 2, 2, 64, 1.0, l2norm=True, gate=True),
    Case(2, 512, 2, 4, 64, 0.1, l2norm=True, gate=True, safe_gate=True, dtype="fp16"),
    Case(3, 1000, 2, 8, 128, 1.0, l2norm=True, gate=True, dt_bias=False, dtype="fp16"),
    Case(4, 1024, 4, 4, 128, 0.1, l2norm=True, gate=True, safe_gate=True, dtype="fp16"),
    Case(1, 64, 1, 1, 64, 1.0, l2norm=True, gate=True, a_log=False, dt_bias=False, safe_gate=True),
    Case(2, 256, 2, 4, 64, 1.0, l2norm=True, gate=True, a_log=False, safe_gate=True),
]
GATE_RECURRENT = [
    Case(1, 64, 1, 1, 64, 1.0, l2norm=True, gate=True, dt_bias=False),
    Case(2, 32, 1, 1, 64, 1.0, l2norm=True, gate=True),
    Case(1, 32, 1, 2, 64, 0.1, l2norm=True, gate=True, safe_gate=True, dtype="fp16"),
    Case(1, 16, 1, 4, 64, 1.0, l2norm=True, gate=True, dt_bias=False, dtype="fp16"),
    Case(2, 16, 2, 2, 64, 0.1, l2norm=True, gate=True, safe_gate=True, dtype="fp16"),
    Case(1, 64, 1, 1, 64, 1.0, l2norm=True, gate=True, a_log=False, dt_bias=False, safe_gate=True),
    Case(1, 32, 1, 2, 64, 1.0, l2norm=True, gate=True, a_log=False, safe_gate=True),
]


@grid(GATE_RECURRENT, GATE_RECURRENT_GPU)
def test_fused_recurrent_gate_in_kernel(case):
    # the raw gate input float32 (as the grid keeps it) beside fp16 q, k, v; A_log = log(uniform(1, 16))
    args, kw = fla_inputs(case, Draw(), beta="sigmoid_rand", A_log="log_uniform")
    q, k, v, g, beta = args
    args = (q, k, v, g.float(), beta)
    if kw["A_log"] is not None:
        kw["A_log"] = kw["A_log"].reshape(-1)
    check_forward(case, fast.fused_recurrent_kda, args, kw)


# ==============================================================================================
# chunk_kda, forward and backward (fla: test_chunk)
# ==============================================================================================

CHUNK_GPU = [
    Case(1, 63, 1, 1, 64, 1.0, dtype="fp16", safe_gate=True),
    Case(2, 500, 3, 3, 60, 1.0, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(2, 1000, 3, 3, 64, 0.1, mask_p=0.5, dtype="fp16", disable_recompute=True),
    Case(3, 1024, 4, 4, 100, 1.0, normalizer=0.1, dtype="fp16"),
    Case(4, 1024, 4, 4, 128, 0.1, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(4, 1024, 4, 4, 128, 0.1, l2norm=True, dtype="fp16", safe_gate=True),
    Case(2, 1500, 4, 4, 128, 0.1, normalizer=10, gate=True, dtype="fp16", disable_recompute=True),
    Case(4, 2048, 8, 8, 64, 0.1, gate=True, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(2, 1024, 2, 4, 64, 0.1, dtype="fp16"),
    Case(2, 1024, 2, 8, 64, 0.1, gate=True, dtype="fp16"),
    Case(2, 1024, 4, 8, 128, 0.1, l2norm=True, gate=True, dtype="fp16"),
    Case(2, 160, 2, 4, 64, 0.1, gate=True, dtype="fp16", safe_gate=True, disable_recompute=True, chunk_size=32),
    Case(2, 1024, 2, 4, 64, 0.1, l2norm=True, gate=True, dtype="bf16", safe_gate=True),
    Case(2, 1024, 2, 4, 64, 0.1, gate=True, dtype="bf16"),
    Case(2, 160, 2, 4, 64, 0.1, gate=True, dtype="bf16", safe_gate=True, disable_recompute=True, chunk_size=32),
    Case(2, 1024, 2, 8, 128, 0.1, l2norm=True, gate=True, dtype="bf16"),
]
#: The same rows at interpreter sizes: fewer tokens and heads, head dims at most 64; every option and dtype kept.
CHUNK = [
    Case(1, 63, 1, 1, 64, 1.0, dtype="fp16", safe_gate=True),
    Case(2, 40, 1, 1, 60, 1.0, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(1, 100, 2, 2, 64, 0.1, mask_p=0.5, dtype="fp16", disable_recompute=True),
    Case(1, 40, 1, 1, 48, 1.0, normalizer=0.1, dtype="fp16"),
    Case(2, 64, 1, 1, 64, 0.1, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(2, 64, 1, 1, 64, 0.1, l2norm=True, dtype="fp16", safe_gate=True),
    Case(1, 70, 1, 1, 64, 0.1, normalizer=10, gate=True, dtype="fp16", disable_recompute=True),
    Case(1, 64, 2, 2, 64, 0.1, gate=True, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(1, 100, 1, 2, 64, 0.1, dtype="fp16"),
    Case(1, 40, 1, 4, 32, 0.1, gate=True, dtype="fp16"),
    Case(1, 64, 1, 2, 64, 0.1, l2norm=True, gate=True, dtype="fp16"),
    Case(1, 100, 1, 2, 64, 0.1, gate=True, dtype="fp16", safe_gate=True, disable_recompute=True, chunk_size=32),
    Case(1, 100, 1, 2, 64, 0.1, l2norm=True, gate=True, dtype="bf16", safe_gate=True),
    Case(1, 100, 1, 2, 64, 0.1, gate=True, dtype="bf16"),
    Case(1, 100, 1, 2, 64, 0.1, gate=True, dtype="bf16", safe_gate=True, disable_recompute=True, chunk_size=32),
    Case(1, 64, 1, 2, 64, 0.1, l2norm=True, gate=True, dtype="bf16"),
]


@grid(CHUNK, CHUNK_GPU)
def test_chunk(case):
    args, kw = fla_inputs(case, Draw())
    check_forward_backward(case, args, kw, fla_kwargs=dict(safe_gate=case.safe_gate,
                                                           disable_recompute=case.disable_recompute))


# ==============================================================================================
# chunk_kda with the state as [V, K] (fla: test_chunk_state_v_first)
# ==============================================================================================

STATE_V_FIRST_CHUNK_GPU = [
    Case(1, 63, 1, D=64, scale=1.0, dtype="fp16"), Case(2, 500, 3, D=60, scale=1.0, dtype="fp16"),
    Case(3, 1024, 4, D=128, scale=0.1, dtype="fp16"), Case(4, 2048, 8, D=64, scale=0.1, dtype="fp16"),
]
STATE_V_FIRST_CHUNK = [
    Case(1, 63, 1, D=64, scale=1.0, dtype="fp16"), Case(2, 40, 1, D=60, scale=1.0, dtype="fp16"),
    Case(1, 64, 2, D=48, scale=0.1, dtype="fp16"), Case(2, 64, 1, D=32, scale=0.1, dtype="fp16"),
]


@grid(STATE_V_FIRST_CHUNK, STATE_V_FIRST_CHUNK_GPU)
def test_chunk_state_v_first(case):
    # initial and final states [N, HV, V, K], and the gradient of the initial state in that layout
    args, kw = fla_inputs(case, Draw())
    kw.update(initial_state=kw["initial_state"].transpose(-1, -2).contiguous(), state_v_first=True)
    check_forward_backward(case, args, kw)


# ==============================================================================================
# chunk_kda with beta's sigmoid in the kernel (fla: test_chunk_use_beta_sigmoid_in_kernel)
# ==============================================================================================

BETA_SIGMOID_CHUNK_GPU = [
    Case(1, 8192, 96, D=128, beta_sigmoid=True, dtype="bf16"),
    Case(1, 8192, 96, D=128, beta_sigmoid=True, neg_eigval=True, dtype="bf16"),
    Case(2, 96, 2, D=64, beta_sigmoid=True, neg_eigval=True, dtype="fp16"),
]
BETA_SIGMOID_CHUNK = [
    Case(1, 100, 1, D=64, beta_sigmoid=True, dtype="bf16"),
    Case(1, 100, 1, D=64, beta_sigmoid=True, neg_eigval=True, dtype="bf16"),
    Case(2, 96, 1, D=32, beta_sigmoid=True, neg_eigval=True, dtype="fp16"),
]


@grid(BETA_SIGMOID_CHUNK, BETA_SIGMOID_CHUNK_GPU)
def test_chunk_use_beta_sigmoid_in_kernel(case):
    # beta given as its logit; the gradient checked is that of the logit
    args, kw = fla_inputs(case, Draw())
    check_forward_backward(case, args, kw)


# ==============================================================================================
# Packed batches, forward and backward (fla: test_chunk_varlen) and inference (test_chunk_varlen_prefill)
# ==============================================================================================

VARLEN_GPU = [
    Case(cu_seqlens=(0, 15), H=4, D=60, mask_p=0.1, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 256, 500, 1000), H=4, D=64, mask_p=0.9, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 256, 500, 1000), H=4, D=128, mask_p=0.5, dtype="fp16"),
    Case(cu_seqlens=(0, 15, 100, 300, 1200, 2000), H=4, D=100, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 100, 300, 1200, 3000, 4096), H=4, D=256, dtype="fp16", safe_gate=True,
         disable_recompute=True),
    Case(cu_seqlens=(0, 31, 96, 160), H=4, D=60, mask_p=0.1, dtype="fp16", gate=True, disable_recompute=True,
         chunk_size=32),
]
VARLEN = [
    Case(cu_seqlens=(0, 15), H=1, D=60, mask_p=0.1, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 30, 50, 80), H=2, D=64, mask_p=0.9, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 20, 45, 70), H=1, D=48, mask_p=0.5, dtype="fp16"),
    Case(cu_seqlens=(0, 15, 30, 45, 70, 80), H=1, D=36, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 10, 40), H=1, D=32, dtype="fp16", safe_gate=True, disable_recompute=True),
    Case(cu_seqlens=(0, 31, 50, 70), H=1, D=60, mask_p=0.1, dtype="fp16", gate=True,
         disable_recompute=True, chunk_size=32),
]


def varlen_inputs(case: Case):
    """The packed cases' draws: q, k, v ``randn``; a share ``mask_p`` of the gates (or of the gate's raw
    inputs) set to ``-1000``, a full reset of that channel; ``A_log = log(uniform(1, 16)) [1, 1, H, 1]``."""
    return fla_inputs(case, Draw(), normal=True, beta="sigmoid_rand", A_log="log_uniform", gate_mask=case.mask_p)


@grid(VARLEN, VARLEN_GPU)
def test_chunk_varlen(case):
    args, kw = varlen_inputs(case)
    fla_kwargs = dict(cu_seqlens_cpu=kw["cu_seqlens"].cpu(), safe_gate=case.safe_gate,
                      disable_recompute=case.disable_recompute)
    check_forward_backward(case, args, kw, fla_kwargs=fla_kwargs)


VARLEN_PREFILL_GPU = [
    Case(cu_seqlens=(0, 8192), H=4, D=60, mask_p=0.1, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 256, 500, 1000), H=4, D=64, mask_p=0.9, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 256, 500, 1000), H=4, D=128, mask_p=0.5, dtype="fp16"),
    Case(cu_seqlens=(0, 15, 100, 300, 1200, 2000), H=4, D=100, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 100, 300, 1200, 3000, 4096), H=4, D=256, dtype="fp16", safe_gate=True,
         disable_recompute=True),
]
VARLEN_PREFILL = [
    Case(cu_seqlens=(0, 200), H=1, D=60, mask_p=0.1, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 40, 70, 100), H=2, D=64, mask_p=0.9, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 40, 70, 100), H=1, D=48, mask_p=0.5, dtype="fp16"),
    Case(cu_seqlens=(0, 15, 40, 60, 100, 130), H=1, D=36, dtype="fp16", gate=True),
    Case(cu_seqlens=(0, 10, 30, 50, 90, 100), H=1, D=32, dtype="fp16", safe_gate=True,
         disable_recompute=True),
]


@grid(VARLEN_PREFILL, VARLEN_PREFILL_GPU)
def test_chunk_varlen_prefill(case):
    # inference: no graph, the chunk size left to the layer (chunk_size=None)
    args, kw = varlen_inputs(case)
    fla_kwargs = dict(cu_seqlens_cpu=kw["cu_seqlens"].cpu(), safe_gate=case.safe_gate,
                      disable_recompute=case.disable_recompute)
    with torch.inference_mode():
        o, S = fast.chunk_kda(*args, **kw, output_final_state=True, **fla_kwargs)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "ht")


# ==============================================================================================
# A serving engine's decode step: a state pool updated in place (fla: test_fused_recurrent_vllm_decode)
# ==============================================================================================

DECODE_GPU = [
    Case(16, 1, 16, D=128, scale=0.1, l2norm=True, dtype="bf16"),
    Case(32, 1, 8, D=64, scale=1.0, dtype="fp16"),
    Case(7, 1, 32, D=128, scale=0.5, normalizer=0.5, l2norm=True, dtype="bf16"),
    Case(16, 1, 16, D=128, scale=0.1, l2norm=True, gate=True, dtype="bf16"),
    Case(32, 1, 8, D=64, scale=1.0, gate=True, dtype="fp16"),
    Case(7, 1, 32, D=128, scale=0.5, normalizer=0.5, l2norm=True, gate=True, safe_gate=True, dtype="bf16"),
]
DECODE = [
    Case(6, 1, 4, D=64, scale=0.1, l2norm=True, dtype="bf16"),
    Case(8, 1, 2, D=32, scale=1.0, dtype="fp16"),
    Case(7, 1, 4, D=64, scale=0.5, normalizer=0.5, l2norm=True, dtype="bf16"),
    Case(6, 1, 4, D=64, scale=0.1, l2norm=True, gate=True, dtype="bf16"),
    Case(8, 1, 2, D=32, scale=1.0, gate=True, dtype="fp16"),
    Case(7, 1, 4, D=64, scale=0.5, normalizer=0.5, l2norm=True, gate=True, safe_gate=True, dtype="bf16"),
]


@grid(DECODE, DECODE_GPU)
def test_fused_recurrent_vllm_decode(case):
    """``B`` sequences of one token each, packed (``cu_seqlens`` int32), reading and writing slots
    ``ssm_state_indices`` (int32, shuffled) of a pool of ``3 B`` states in place. The slots no sequence
    owns hold ``1e30`` and must come back bit for bit: a read of one would poison an output, a write
    would show."""
    B, H, D = case.B, case.H, case.D
    packed = dataclasses.replace(case, cu_seqlens=tuple(range(B + 1)))
    draw = Draw()
    (q, k, v, g, beta), kw = fla_inputs(packed, draw, A_log="log_uniform")  # a raw gate input in q's dtype
    if case.gate:
        kw["A_log"] = kw["A_log"].reshape(-1)
    P = 3 * B
    pool = draw.randn(P, H, D, D)
    slots = torch.randperm(P, generator=draw.gen)[:B].to(device=DEVICE, dtype=torch.int32)
    untouched = torch.ones(P, dtype=torch.bool, device=DEVICE)
    untouched[slots.long()] = False
    pool[untouched] = 1e30
    before = pool.clone()
    cu = kw.pop("cu_seqlens").to(torch.int32)
    del kw["initial_state"]  # the pool stands in for it

    o, out = fast.fused_recurrent_kda(q, k, v, g, beta, **kw, initial_state=pool, cu_seqlens=cu,
                                      ssm_state_indices=slots, inplace_final_state=True)
    # one token a sequence: 16-token chunks keep the reference's padded chunks small
    o_ref, S_ref = reference(q, k, v, g, beta, **kw, initial_state=before[slots.long()], cu_seqlens=cu,
                             chunk_size=16)
    assert out is pool
    assert_close(o, o_ref, LOW, "o")
    assert_close(pool[slots.long()], S_ref, LOW, "ht")
    assert torch.equal(pool[untouched], before[untouched]), "a slot no sequence owns changed"


# ==============================================================================================
# The gate alone, forward and backward (fla: test_gate)
# ==============================================================================================

GATE_GPU = [
    Case(1, 2, 2, D=12, gate=True, dt_bias=False, safe_gate=True),
    Case(1, 32, 2, D=16, gate=True, dt_bias=False, safe_gate=True),
    Case(2, 64, 4, D=32, gate=True, dt_bias=False, safe_gate=True),
    Case(4, 128, 8, D=64, gate=True, dt_bias=False, safe_gate=True),
    Case(4, 128, 8, D=128, gate=True, dt_bias=False),
    Case(1, 2, 2, D=12, gate=True),
    Case(1, 32, 2, D=16, gate=True),
    Case(2, 64, 4, D=32, gate=True),
    Case(4, 128, 8, D=64, gate=True),
    Case(4, 128, 8, D=128, gate=True),
    Case(1, 2, 2, D=12, gate=True, a_log=False, dt_bias=False, safe_gate=True),
    Case(2, 64, 4, D=32, gate=True, a_log=False, dt_bias=False, safe_gate=True),
    Case(4, 128, 8, D=64, gate=True, a_log=False, safe_gate=True),
    Case(4, 128, 8, D=128, gate=True, a_log=False, safe_gate=True),
]
#: The same rows with the widest ones (B = 4, H = 8) narrowed.
GATE = [c if c.B < 4 else dataclasses.replace(c, B=1, H=2) for c in GATE_GPU]

@grid(GATE, GATE_GPU)
def test_gate(case):
    """Stage 1 with the gate in the kernel (the gate, raised to the float32 floor, then the in-chunk
    cumsum: ``fast.chunk_local_cumsum``) and its backward (``gate_cumsum_bwd``: ``dg``, ``dA_log``,
    ``ddt_bias``) against float64 autograd of the same, on the grid's raw gate inputs ``10 randn``."""
    B, T, H, D, C = case.B, case.T, case.H, case.D, 64
    draw = Draw()
    x = 10 * draw.randn(B, T, H, D)
    A_log = torch.log(draw.uniform(1, 16, 1, 1, H, 1)) if case.a_log else None
    dt_bias = draw.randn(H * D) if case.dt_bias else None
    gate = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, lower_bound=case.lower_bound)
    G = fast.chunk_local_cumsum(x, C, **gate)
    dG = draw.randn(B, T, H, D)
    grads = gate_cumsum_bwd(dG, C, g=x, **gate)

    x64, A64, b64 = (None if t is None else t.double().requires_grad_(True) for t in (x, A_log, dt_bias))
    if case.safe_gate:
        g64 = chunked.lowerbound_gate(x64, A64, b64, lower_bound=case.lower_bound)
    else:
        g64 = chunked.kda_gate(x64, A64, b64)
    G_ref = chunked.chunk_local_cumsum(g64.clamp_min(gate_floor(torch.float32)), C)
    G_ref.backward(dG.double())
    assert_close(G, G_ref, F32, "G")
    assert_close(grads.dg, x64.grad, F32, "dg")
    if case.a_log:
        assert_close(grads.dA_log, A64.grad.reshape(H), F32, "dA_log")
    if case.dt_bias:
        assert_close(grads.ddt_bias, b64.grad.reshape(H, D), F32, "ddt_bias")


# ==============================================================================================
# The chunk states of a prefill, for prefix caching (fla: test_chunk_return_intermediate_states)
# ==============================================================================================

INTERMEDIATE_GPU = [Case(2, 1024, 4, D=128, dtype="bf16"), Case(cu_seqlens=(0, 512, 1024), H=4, D=128, dtype="bf16")]
INTERMEDIATE = [Case(2, 100, 1, D=64, dtype="bf16"), Case(cu_seqlens=(0, 50, 120), H=1, D=32, dtype="bf16")]


@grid(INTERMEDIATE, INTERMEDIATE_GPU)
def test_chunk_return_intermediate_states(case):
    """``h [NC, HV, K, V]`` float32, chunk by chunk and sequence by sequence: chunk ``i`` of a sequence
    holds the state after the tokens of its chunks before ``i`` (its initial state for ``i = 0``).

    flash-linear-attention returns ``h`` as ``[B, NT, H, K, V]`` in the inputs' dtype; this layer keeps
    the layout and dtype of its other states."""
    C = 64  # the chunk size with return_intermediate_states
    args, kw = fla_inputs(case, Draw(), normal=True)
    with torch.inference_mode():
        o, S, h = fast.chunk_kda(*args, **kw, output_final_state=True, return_intermediate_states=True,
                                 disable_recompute=False)
    cu = case.cu_seqlens
    spans = [(b, 0, case.T) for b in range(case.B)] if cu is None else [(0, a, e) for a, e in zip(cu[:-1], cu[1:])]
    NC = sum(-(-(e - a) // C) for _, a, e in spans)
    N, HV, D = len(spans), case.hv, case.D
    assert o.shape == args[2].shape and S.shape == (N, HV, D, D)
    assert h.shape == (NC, HV, D, D) and h.dtype == torch.float32
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "ht")
    S0, h_ref = kw["initial_state"], []
    for n, (b, bos, eos) in enumerate(spans):
        h_ref.append(S0[n].double())
        for t in range(bos + C, eos, C):  # the state after the tokens bos .. t
            prefix = dict(kw, initial_state=S0[n : n + 1], cu_seqlens=None)
            h_ref.append(reference(*(x[b : b + 1, bos:t] for x in args), **prefix)[1][0])
    assert_close(h, torch.stack(h_ref), LOW, "h")


# ==============================================================================================
# Every inference option at once (fla: test_flash_kda_chunk, test_flash_kda_chunk_varlen)
# ==============================================================================================

ALL_OPTIONS = dict(l2norm=True, gate=True, safe_gate=True, beta_sigmoid=True, dtype="bf16")
ALL_OPTIONS_GPU = [
    Case(1, 1024, 4, D=128, **ALL_OPTIONS), Case(2, 2048, 8, D=128, **ALL_OPTIONS),
    Case(1, 4096, 16, D=128, **ALL_OPTIONS), Case(cu_seqlens=(0, 256, 500, 1000), H=4, D=128, **ALL_OPTIONS),
    Case(cu_seqlens=(0, 100, 300, 1200, 2000), H=8, D=128, **ALL_OPTIONS),
    Case(cu_seqlens=(0, 101, 303, 1205, 3007, 4096), H=16, D=128, **ALL_OPTIONS),
]
#: The grid's rows are bfloat16; a float16 row besides.
ALL_OPTIONS_CPU = [
    Case(1, 100, 2, D=64, **ALL_OPTIONS), Case(cu_seqlens=(0, 30, 50, 100), H=1, D=64, **ALL_OPTIONS),
    Case(cu_seqlens=(0, 30, 50, 100), H=1, D=64, **dict(ALL_OPTIONS, dtype="fp16")),
]


@grid(ALL_OPTIONS_CPU, ALL_OPTIONS_GPU)
def test_chunk_all_inference_options(case):
    """L2 norm, the lower-bound gate (``A_log [H]``, ``dt_bias [H * D]``), beta's sigmoid and a ``[V, K]``
    state in one inference call, as a serving engine's prefill makes it."""
    args, kw = fla_inputs(case, Draw(), normal=case.cu_seqlens is not None, A_log="log_uniform")
    kw.update(A_log=kw["A_log"].reshape(-1), state_v_first=True)
    with torch.inference_mode():
        o, S = fast.chunk_kda(*args, **kw, output_final_state=True, safe_gate=True)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "ht")


# ==============================================================================================
# chunk_kda and fused_recurrent_kda on one call (the recurrence is the grid's gold for the chunks)
# ==============================================================================================

BOTH_GPU = [
    Case(2, 1024, 4, 8, 128, 0.1, l2norm=True, gate=True, safe_gate=True, beta_sigmoid=True, neg_eigval=True),
    Case(cu_seqlens=(0, 100, 300, 1200, 2000), H=4, HV=8, D=128, gate=True, beta_sigmoid=True),
]
BOTH = [
    Case(2, 40, 1, 2, 32, 0.1, l2norm=True, gate=True, safe_gate=True, beta_sigmoid=True, neg_eigval=True),
    Case(cu_seqlens=(0, 15, 50), H=1, HV=2, D=48, gate=True, beta_sigmoid=True),
]


@grid(BOTH, BOTH_GPU)
def test_chunk_matches_fused_recurrent(case):
    # the same inference call through both paths, a [V, K] state included: each within the bound
    args, kw = fla_inputs(case, Draw(), A_log="log_uniform")
    kw.update(A_log=kw["A_log"].reshape(-1), state_v_first=True)
    with torch.inference_mode():
        o_c, S_c = fast.chunk_kda(*args, **kw, output_final_state=True)
        o_r, S_r = fast.fused_recurrent_kda(*args, **kw, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    for path, o, S in (("chunk", o_c, S_c), ("fused_recurrent", o_r, S_r)):
        assert_close(o, o_ref, F32, f"o ({path})")
        assert_close(S, S_ref, F32, f"ht ({path})")
