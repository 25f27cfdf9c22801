"""Launch and precision settings of the fast layer: one typed config per kernel, chosen in one place.

Every kernel's launcher takes its config as an argument; :func:`plan_for` picks all of
them for a device, and the public functions (``chunk_kda``, ``fused_recurrent_kda``)
accept a :class:`Plan` to use instead (``plan=``). Tests and probes build variants with
``dataclasses.replace``; nothing reads or flips a module global. Why each value is
what it is, with the measurements, is on the docs' kernel page.

Glossary
--------
==========  ==================================================================
``BK, BV``  the widest tile of ``K`` / ``V`` one program takes
``warps``   warps per program (``num_warps``)
``stages``  software-pipelining depth of a kernel's loops (``num_stages``)
``lowp``    products on bf16/fp16 operands (the intermediates' dtype) instead of tf32 ones
==========  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["ForwardConfig", "LocalConfig", "OnePassConfig", "WYFactorsConfig", "StateConfig", "OutputConfig",
           "DecodeConfig", "StepConfig", "BackwardConfig", "KernelLaunch", "Plan", "plan_for", "plan_for_shared_memory",
           "SAFE_SPAN"]

#: Largest in-sub-chunk decay span ``G_ref - G_r`` the tensor-core diagonal takes (a numerical limit,
#: not a tuning: every factor stays below ``exp(80) ~ 5.5e34`` inside float32; see the kernel page).
SAFE_SPAN = 80.0


@dataclass(frozen=True)
class KernelLaunch:
    """A kernel's launch shape: tile widths, warps, pipeline depth, and an optional register cap."""

    warps: int
    stages: int = 1
    BK: Optional[int] = None
    BV: Optional[int] = None
    maxnreg: Optional[int] = None


@dataclass(frozen=True)
class ForwardConfig:
    """How ``chunk_kda``'s forward composes its stages.

    ``short_chunk``: the inference forward's chunk size where the state pass has at least
    ``short_chunk_min_programs_per_sm`` programs per SM at 64 value columns (else 64; ``None``:
    always 64). ``fused_state_output``: stages 5 and 6 as one kernel where its grid holds at
    least ``fused_min_programs_per_sm`` programs per SM at 64 value columns
    (:func:`~kda_explained.fast.state.output_fused`), and always after the one pass.
    ``one_pass_fold``: how much of the WY representation the one pass leaves to the state pass
    (0 none, 2 ``W = Mb k_gamma`` and ``U = Mb v`` both). ``piece_tokens``: the inference forward
    cuts the sequences longer than this into pieces of this many tokens (best a multiple of 64,
    so that no piece ends in a partial chunk) that run at once (:mod:`kda_explained.chunked.pieces`), where the state pass's grid at 64 value
    columns holds fewer than ``pieces_below_programs_per_sm`` programs per SM and ``V + K`` fits
    one value tile; ``None``: whole sequences always.
    """

    short_chunk: Optional[int] = 16
    short_chunk_min_programs_per_sm: float = 1.0
    fused_state_output: bool = True
    fused_min_programs_per_sm: float = 1.5
    one_pass_fold: int = 2
    piece_tokens: Optional[int] = None
    pieces_below_programs_per_sm: float = 1.0


@dataclass(frozen=True)
class LocalConfig:
    """Stages 2-4 in one kernel (:func:`~kda_explained.fast.local.chunk_local_factors`): the keys'
    pass and the queries' pass, each ``(BK, warps)``, and the pipeline depth of their ``K`` loops.
    ``span``: the decay span past which a diagonal block is recomputed exactly;
    ``ut_precision``: the UT transform's products for bf16/fp16 inputs (float32 inputs: "ieee")."""

    keys: KernelLaunch = KernelLaunch(warps=1, stages=2, BK=32)
    queries: KernelLaunch = KernelLaunch(warps=1, stages=2, BK=32)
    span: float = SAFE_SPAN
    ut_precision: str = "tf32"


@dataclass(frozen=True)
class OnePassConfig:
    """Stages 1-4 in one pass for 16- and 32-token chunks
    (:func:`~kda_explained.fast.local.chunk_local_factors_one_pass`). ``max_chunk``: the longest
    chunk it takes (at 64 tokens its blocks spill)."""

    launch: KernelLaunch = KernelLaunch(warps=1, stages=2, BK=32, maxnreg=168)
    max_chunk: int = 32
    span: float = SAFE_SPAN
    ut_precision: str = "tf32"


@dataclass(frozen=True)
class WYFactorsConfig:
    """Stage 4 alone from a kept ``M`` (:func:`~kda_explained.fast.local.chunk_wy_factors`)."""

    launch: KernelLaunch = KernelLaunch(warps=8, BK=64, BV=64)


@dataclass(frozen=True)
class StateConfig:
    """The state pass (stage 5, and 6 when fused) and the loops that walk a sequence's chunks.

    ``stages`` / ``stages_lowp``: pipeline depth for float32 / bf16-fp16 intermediates;
    ``lowp``: bf16/fp16 products; ``prefetch``: load ``G``'s chunk-end row (and ``A_qk``) one
    chunk ahead by hand; ``warps`` for ``K > 64``; ``BV``: value columns per program (``None``:
    64, halved while the grid leaves SMs idle); ``fused_programs_per_sm``: how full the fused
    state + output kernel's grid must be before its value tile stops halving."""

    stages: int = 2
    stages_lowp: int = 3
    lowp: bool = True
    prefetch: bool = True
    warps: int = 4
    BV: Optional[int] = None
    fused_programs_per_sm: float = 1.5


@dataclass(frozen=True)
class OutputConfig:
    """Stage 6 alone (:func:`~kda_explained.fast.output.chunk_output`)."""

    launch: KernelLaunch = KernelLaunch(warps=4, stages=2, BV=64)
    lowp: bool = True


@dataclass(frozen=True)
class DecodeConfig:
    """The token-by-token kernel (:func:`~kda_explained.fast.recurrent.fused_recurrent_kda_fwd`).

    ``launch.BV`` is the widest value tile; it halves (down to 16) while the grid holds fewer than
    ``min_programs_per_sm`` programs per SM, so that a few sequences still stream their states
    through every SM (0: always ``launch.BV``)."""

    launch: KernelLaunch = KernelLaunch(warps=2, BV=64)
    min_programs_per_sm: float = 2.0


@dataclass(frozen=True)
class StepConfig:
    """A decoding step's kernels (:mod:`kda_explained.fast.step`). ``conv_block``: channels per program
    of the short convolution; ``norm_elements``: elements per program of the gated norm (whole rows,
    at most 16 of them); ``attention_block``: keys per loop block of the split-key attention, and
    ``attention_programs``: the programs its splits aim for in one step (a few per SM, so that one
    row and head at batch 1 still spreads over the GPU)."""

    conv_block: int = 256
    norm_elements: int = 4096
    attention_block: int = 64
    attention_programs: int = 512


def _default_backward_launches() -> dict:
    return {
        "output": KernelLaunch(warps=8, BV=64),
        "recurrence": KernelLaunch(warps=4, stages=1, BV=64),
        "state_chunks": KernelLaunch(warps=4, BK=64, BV=64),
        "wy": KernelLaunch(warps=4, BK=64, BV=64),
        "ut": KernelLaunch(warps=4),
        "state_wy": KernelLaunch(warps=4, stages=1, BK=32, BV=64),
        "intra": KernelLaunch(warps=4, stages=1, BK=64),
    }


@dataclass(frozen=True)
class BackwardConfig:
    """The backward kernels (:mod:`kda_explained.fast.backward`): a launch per kernel, by name.

    ``state_wy_fused``: stages 6, 5 (per chunk) and 4 of the backward in one kernel (else three);
    ``recurrence_lowp`` / ``recurrence_prefetch``: as the forward state pass's ``lowp`` and
    ``prefetch``; ``ut_precision``: the UT transform's backward products; ``intra_precision``:
    the intra-chunk backward's products for tf32-class inputs (float32 inputs always take "ieee");
    ``span``: as :class:`LocalConfig`'s."""

    launches: dict = field(default_factory=_default_backward_launches)
    state_wy_fused: bool = True
    recurrence_lowp: bool = True
    recurrence_prefetch: bool = True
    ut_precision: str = "tf32x3"
    intra_precision: str = "ieee"
    span: float = SAFE_SPAN

    def __getitem__(self, name: str) -> KernelLaunch:
        return self.launches[name]

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.launches.items())), self.state_wy_fused, self.recurrence_lowp,
                     self.recurrence_prefetch, self.ut_precision, self.intra_precision, self.span))


@dataclass(frozen=True)
class Plan:
    """Every kernel's config, for one device."""

    forward: ForwardConfig = ForwardConfig()
    local: LocalConfig = LocalConfig()
    one_pass: OnePassConfig = OnePassConfig()
    wy_factors: WYFactorsConfig = WYFactorsConfig()
    state: StateConfig = StateConfig()
    output: OutputConfig = OutputConfig()
    decode: DecodeConfig = DecodeConfig()
    step: StepConfig = StepConfig()
    backward: BackwardConfig = field(default_factory=BackwardConfig)


#: The plan measured best on Hopper (H100; the H200 is the same chip): the kernel page says why.
HOPPER = Plan()
#: Shared memory per block (opt-in) that the Hopper plan's deepest pipelines need: the fused state +
#: output kernel at 3 stages with 64-token chunks takes 184 KB.
_HOPPER_SHARED_MEMORY = 200 * 1024
#: What the float32 state passes take at 2 stages with 64-token chunks (the fused one 144 KB, compiled
#: for sm_80, sm_86 and sm_89 by benchmarks/probe/shared_memory.py); below it they run at 1 stage.
_FLOAT32_TWO_STAGES_SHARED_MEMORY = 144 * 1024


def plan_for(device) -> Plan:
    """The plan for ``device``: Hopper's, with the pipelines made shallower where the device has
    less shared memory than they need (a launch there would fail). Off the GPU (the interpreter)
    Hopper's, so that the CPU tests run the same compile-time choices."""
    device = torch.device(device)
    if device.type != "cuda":
        return HOPPER
    return _plan_for_cuda(device.index if device.index is not None else torch.cuda.current_device())


def _plan_for_cuda(index: int) -> Plan:
    props = torch.cuda.get_device_properties(index)
    return plan_for_shared_memory(getattr(props, "shared_memory_per_block_optin", _HOPPER_SHARED_MEMORY))


def plan_for_shared_memory(shared: int) -> Plan:
    """The plan for a GPU whose blocks may take ``shared`` bytes of shared memory (opt-in): Hopper's,
    or, below what its deepest pipelines need, the same with shallower state passes: bf16/fp16 at 2
    stages (A100: 163 KB), and float32 at 1 as well where even 2 do not fit (L4, RTX 4090, A10: 99 KB).

    >>> [(p.state.stages_lowp, p.state.stages) for p in map(plan_for_shared_memory, (227 << 10, 163 << 10, 99 << 10))]
    [(3, 2), (2, 2), (2, 1)]
    """
    if shared >= _HOPPER_SHARED_MEMORY:
        return HOPPER
    return Plan(state=StateConfig(stages_lowp=2, stages=2 if shared >= _FLOAT32_TWO_STAGES_SHARED_MEMORY else 1))
