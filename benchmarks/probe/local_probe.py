"""Where the fused stage 2-4 kernel spends its time: variants with phases cut off, timed on the GPU.

    python benchmarks/probe/local_probe.py
"""
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from kda_explained import fast  # noqa: E402
from gpu_bench import bench, make_inputs  # noqa: E402

SRC = os.path.join(HERE, "..", "..", "kda_explained", "fast", "local.py")


def variant(name, edit):
    src = open(SRC).read().replace("from ._meta import", "from kda_explained.fast._meta import")
    src = edit(src)
    path = f"/tmp/{name}.py"
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def cut(src, start, end_marker="\n\nclass LocalFactors", insert=""):
    a = src.index(start)
    b = src.index(end_marker)
    return src[:a] + insert + src[b:]


M_STORES = """    _store_block(Ak_h, M00, t0, eos, SA, 0, BT, BC, BC)
    _store_block(Ak_h, M10, t1, eos, SA, 0, BT, BC, BC)
    _store_block(Ak_h, M11, t1, eos, SA, BC, BT, BC, BC)
    _store_block(Ak_h, M20, t2, eos, SA, 0, BT, BC, BC)
    _store_block(Ak_h, M21, t2, eos, SA, BC, BT, BC, BC)
    _store_block(Ak_h, M22, t2, eos, SA, 2 * BC, BT, BC, BC)
    _store_block(Ak_h, M30, t3, eos, SA, 0, BT, BC, BC)
    _store_block(Ak_h, M31, t3, eos, SA, BC, BT, BC, BC)
    _store_block(Ak_h, M32, t3, eos, SA, 2 * BC, BT, BC, BC)
    _store_block(Ak_h, M33, t3, eos, SA, 3 * BC, BT, BC, BC)
"""

VARIANTS = {
    "full": lambda s: s,
    "no_exact": lambda s: s.replace("if span0 > SPAN:", "if False:").replace("if span1 > SPAN:", "if False:")
    .replace("if span2 > SPAN:", "if False:").replace("if span3 > SPAN:", "if False:"),
    "phase1_only": lambda s: cut(s, "    # ==== 2."),
    "phase1_2": lambda s: cut(s, "    # ==== 3.", insert=M_STORES),
    "phase1_no_qk": lambda s: cut(s, "    # ==== 2.").replace("Q00 += tl.dot", "Q00 += 0 * tl.dot"),
}

if __name__ == "__main__":
    q, k, v, g, beta = make_inputs(8, 4096, 16, 128)
    C, scale = 64, 128 ** -0.5
    with torch.inference_mode():
        G, b32 = fast.chunk_local_cumsum(g, C, beta=beta)
        for name, edit in VARIANTS.items():
            m = variant(f"local_{name}", edit)
            for bk, w in ((16, 4), (32, 4), (16, 2)):
                m.LOCAL_BK, m.LOCAL_WARPS = bk, w
                fn = lambda: m.chunk_local_factors(q, k, v, G, b32, scale, C, store_akk=True)  # noqa: E731
                fn()
                ms = bench(fn)
                kern = m._chunk_local_kernel
                print(f"{name:14s} BK={bk} warps={w}: {ms:.3f} ms", flush=True)
