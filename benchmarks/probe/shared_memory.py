"""Whether every kernel launch fits a GPU's shared memory under the plan chosen for it, without that GPU.

    python benchmarks/probe/shared_memory.py [--gpu NAME ...]

:func:`kda_explained.fast.config.plan_for` picks the Hopper plan, or a shallower one where a
block may take less shared memory than Hopper's deepest pipelines need
(:func:`~kda_explained.fast.config.plan_for_shared_memory`). A launch that asks for more than
the GPU has fails there, so the rule is checked here for each GPU of :data:`GPUS`: every launch
that the forward (bf16 and float32, head dims 128 and 256, with the in-kernel options, and the
long sequence in pieces), a training step, decoding, a decoding step's kernels and general
DPLR make at the benchmark's shapes is
captured on CPU tensors (the launch rules see the GPU's SM count), compiled for the GPU's
architecture with the Triton on this machine, and its shared memory compared with the GPU's
per-block limit. Prints the largest kernels and every one over the limit; exits 1 if any is.
Run it with the Triton the GPUs run (3.6 on the lent machines).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import loop_loads  # noqa: E402
from kda_explained import fast  # noqa: E402
from kda_explained.fast import dplr as fast_dplr  # noqa: E402
from kda_explained.fast.config import plan_for_shared_memory  # noqa: E402

#: name -> (compute capability, SMs, shared memory a block may opt in to, bytes)
GPUS = {
    "H100/H200": (90, 132, 232448),
    "A100": (80, 108, 166912),
    "L4/RTX 4090": (89, 58, 101376),
    "A10/RTX 3090": (86, 72, 101376),
}


def inputs(B, T, H, D=128, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3))
    gate = -torch.rand(B, T, H, D, generator=g)
    return q, k, v, gate.to(dtype) if dtype == torch.float32 else gate, torch.rand(B, T, H, generator=g).to(dtype)


def capture_launches(plan, sms: int) -> list:
    """Every launch of the forward, a training step and decoding, on CPU tensors, under ``plan``."""
    loop_loads.launch_on_this_cpu(sms)
    launches = []

    def run(fn):
        loop_loads.captured.clear()
        fn()
        launches.extend(loop_loads.captured)

    pieces = replace(plan, forward=replace(plan.forward, piece_tokens=64))
    for (B, T, H), D, dtype in [((8, 128, 16), 128, torch.bfloat16), ((1, 128, 96), 128, torch.bfloat16),
                                ((1, 256, 16), 128, torch.bfloat16), ((8, 128, 16), 128, torch.float32),
                                ((1, 256, 16), 128, torch.float32), ((8, 128, 16), 256, torch.bfloat16),
                                ((1, 256, 4), 256, torch.bfloat16)]:
        q, k, v, gate, beta = inputs(B, T, H, D, dtype)
        with torch.inference_mode():
            run(lambda: fast.chunk_kda(q, k, v, gate, beta, plan=plan))
            run(lambda: fast.chunk_kda(q, k, v, gate, beta, plan=plan, use_gate_in_kernel=True, A_log=torch.zeros(H),
                                       dt_bias=torch.zeros(H * D), use_qk_l2norm_in_kernel=True,
                                       use_beta_sigmoid_in_kernel=True))
            run(lambda: fast.chunk_kda(q, k, v, gate, beta, plan=pieces))
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, gate, beta)]
        run(lambda: fast.chunk_kda(*xs, output_final_state=True, plan=plan)[0].float().sum().backward())
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, gate, beta)]
        run(lambda: fast.chunk_kda(*xs, output_final_state=True, plan=plan, use_gate_in_kernel=True,
                                   A_log=torch.zeros(H, requires_grad=True), use_qk_l2norm_in_kernel=True,
                                   dt_bias=torch.zeros(H * D, requires_grad=True),
                                   use_beta_sigmoid_in_kernel=True)[0].float().sum().backward())
    for N in (256, 1):
        q, k, v, gate, beta = inputs(N, 1, 32)
        with torch.inference_mode():
            run(lambda: fast.fused_recurrent_kda(q, k, v, gate, beta, initial_state=torch.zeros(N, 32, 128, 128),
                                                 output_final_state=True, plan=plan))
    # general DPLR (its own launch settings), at each chunk size
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, gate, _ = inputs(1, 256, 16, 128, dtype)
        for C in (16, 32, 64):
            with torch.inference_mode():
                run(lambda: fast_dplr.dplr(q, k, v, k, -k, gate.float(), chunk_size=C))
    # a decoding step's kernels: the short convolution, the gated norm, attention over a KV buffer
    with torch.inference_mode():
        x = torch.randn(256, 4096).bfloat16()
        run(lambda: fast.short_conv_step(x, torch.randn(256, 4096, 3).bfloat16(), torch.randn(4096, 4)))
        o = torch.randn(256, 32, 128).bfloat16()
        run(lambda: fast.gated_rms_norm(o, o, torch.ones(128), 1e-5))
        kv = torch.randn(2, 16, 4096, 128).bfloat16()
        run(lambda: fast.decode_attention(torch.randn(2, 16, 128).bfloat16(), kv, kv,
                                          torch.ones(2, 4096, dtype=torch.bool), torch.tensor([1000])))
    return launches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", nargs="*", default=list(GPUS), choices=list(GPUS))
    args = ap.parse_args()
    print(f"triton {triton.__version__}")
    over = 0
    for gpu in args.gpu:
        arch, sms, limit = GPUS[gpu]
        plan = plan_for_shared_memory(limit)
        sizes = {}
        for fn, a, kw in capture_launches(plan, sms):
            key = (fn.fn.__name__, tuple(sorted((k, str(v)) for k, v in kw.items() if k.isupper() or k.startswith("num_"))))
            if key not in sizes:
                sizes[key] = loop_loads.compile_launch(fn, a, kw, arch=arch).metadata.shared
        worst = sorted(sizes.items(), key=lambda item: -item[1])
        bad = [(key, b) for key, b in worst if b > limit]
        over += len(bad)
        print(f"\n{gpu} (sm_{arch}, {limit // 1024} KB a block, plan state stages_lowp={plan.state.stages_lowp}): "
              f"{len(sizes)} distinct launches, largest {worst[0][1] // 1024} KB ({worst[0][0][0]}), "
              f"{len(bad)} over the limit")
        for (name, consts), b in (bad or worst[:3]):
            print(f"  {'OVER ' if b > limit else ''}{name:34s} {b // 1024:4d} KB  {dict(consts)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
