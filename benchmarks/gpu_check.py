"""Quick GPU accuracy check of every fast kernel against the float64 chunked layer (run before timing).

    python benchmarks/gpu_check.py

Prints one line per case with the relative RMS errors of ``o`` and the final
state, and exits non-zero if any exceeds its bound in the design contract (docs/design.md).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained import chunked, fast  # noqa: E402
from kda_explained.testing import TOLERANCES, rel_rms_error  # noqa: E402


def case(B, T, H, HV, K, V, dtype, cu=None, lower_bound=-5.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", generator=gen).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, HV, V, device="cuda", generator=gen).to(dtype)
    g = chunked.lowerbound_gate(torch.randn(B, T, HV, K, device="cuda", generator=gen), lower_bound=lower_bound)
    beta = torch.rand(B, T, HV, device="cuda", generator=gen).to(dtype)
    N = B if cu is None else len(cu) - 1
    S0 = torch.randn(N, HV, K, V, device="cuda", generator=gen) * 0.1
    cu_t = None if cu is None else torch.tensor(cu, device="cuda")
    with torch.inference_mode():
        o, S = fast.chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True, cu_seqlens=cu_t)
        ref = [x.double() for x in (q, k, v, g, beta, S0)]
        o_ref, S_ref = chunked.kda(*ref[:5], initial_state=ref[5], output_final_state=True, cu_seqlens=cu_t)
        o_r, S_r = fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                            cu_seqlens=cu_t)
    return [rel_rms_error(o, o_ref), rel_rms_error(S, S_ref), rel_rms_error(o_r, o_ref), rel_rms_error(S_r, S_ref)]


def main() -> int:
    failed = 0
    cases = [
        ("fp32 B2 T300 GVA", dict(B=2, T=300, H=2, HV=4, K=128, V=128, dtype=torch.float32), "fast_tf32_vs_f64"),
        ("bf16 B2 T1000", dict(B=2, T=1000, H=4, HV=4, K=128, V=128, dtype=torch.bfloat16), "fast_bf16_output"),
        ("bf16 varlen", dict(B=1, T=1000, H=4, HV=4, K=128, V=128, dtype=torch.bfloat16,
                             cu=[0, 1, 300, 300, 777, 1000]), "fast_bf16_output"),
        ("bf16 K64 V96", dict(B=1, T=200, H=2, HV=2, K=64, V=96, dtype=torch.bfloat16), "fast_bf16_output"),
        ("fp16 K256", dict(B=1, T=200, H=1, HV=1, K=256, V=256, dtype=torch.float16), "fast_bf16_output"),
    ]
    for name, kw, bound in cases:
        errs = case(**kw)
        ok = max(errs) <= TOLERANCES[bound]
        failed += not ok
        print(f"{name:<20} chunk o {errs[0]:.2e} S {errs[1]:.2e} | recurrent o {errs[2]:.2e} S {errs[3]:.2e} "
              f"| bound {TOLERANCES[bound]:.0e} {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
