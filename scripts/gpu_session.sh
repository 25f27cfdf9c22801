#!/usr/bin/env bash
# Everything the project checks and measures on a GPU, in one call (device time is scarce):
# the gpu-marked tests, the accuracy check of every kernel, the per-stage timings, and the
# benchmark against flash-linear-attention, writing into ${OUT:-benchmarks/results}.
#
#   bash scripts/gpu_session.sh [tests|tests-all|warm|wait-warm|tests-fwd|tests-bwd|check|decode-full|dplr|pieces|train-chunks|synthetic|stages|bench|train|sweep|bwd|decode|profile|
#                                fwdprof|options ...]   (default: tests check stages bench)
#
# `tests` takes > 6 minutes on an H100, more than one device call holds beside other steps:
# `tests-fwd` and `tests-bwd` split it in two (together the same tests).
#
# Needs a CUDA GPU with torch and triton. flash-linear-attention is taken from .whl/ when
# present (../shared/tools/fla-wheels.sh fetches the fla-core wheel there), as on the lent
# H100, which cannot reach a package index. fla's cold autotune takes ~80 s per shape, so
# `bench` alone runs 5-6 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kda_site .whl/*.whl
    export PYTHONPATH=/tmp/kda_site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# autotune results kept between machines (fla's cold autotune of its backward takes > 5 minutes a shape):
# a git-ignored .tcache carried to the device; only its *.autotune.json files are worth bringing back
if [ -d .tcache ]; then
    export TRITON_CACHE_DIR=$PWD/.tcache TRITON_CACHE_AUTOTUNING=1
fi
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests check stages bench)
for step in "${steps[@]}"; do
    echo "== $step"
    case "$step" in
        tests)  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_gpu.py tests/test_layers.py tests/test_decode_step.py ;;
        tests-all) # every gpu-marked test, over pytest-xdist workers where the machine has it
                python3 -m pytest -q -m gpu -p no:cacheprovider -n "${NPROC:-4}" tests/ \
                    || echo "== tests-all: pytest exited $?"
                # the device-agnostic compile and decoding-step tests, on the GPU (inductor, CUDA graphs)
                python3 -m pytest -q -p no:cacheprovider -n "${NPROC:-4}" tests/test_compile.py \
                    tests/test_decode_step.py || echo "== tests-all (compile, decode step): pytest exited $?" ;;
        warm)   # compile every kernel the benchmarks time, one background process a shape, into .tcache
                # (the benchmarks then find them compiled; the autotuners still choose on an idle GPU)
                export TRITON_CACHE_DIR=$PWD/.tcache
                mkdir -p .tcache "$out/warm"
                for a in "fwd B8_T4096_H16" "fwd B1_T8192_H96" "fwd B1_T65536_H16" "fwd varlen_H64" "fwd packed256_H32" \
                         "train B8_T4096_H16" "train B1_T8192_H96" "decode"; do
                    # shellcheck disable=SC2086
                    python3 benchmarks/probe/warm_kernels.py $a > "$out/warm/${a// /_}.log" 2>&1 &
                done ;;
        wait-warm) wait; tail -n 3 "$out"/warm/*.log ;;
        tests-fwd) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_gpu.py \
                       -k "not gradients and not long_sequence" ;;
        tests-bwd) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_gpu.py tests/test_layers.py \
                       -k "gradients or long_sequence or test_layers" ;;
        check)  python3 benchmarks/gpu_check.py ;;
        stages) python3 benchmarks/gpu_stages.py --out "$out" ;;
        bench)  python3 benchmarks/gpu_bench.py --out "$out" ;;
        train)  python3 benchmarks/gpu_train_bench.py --out "$out" ;;
        sweep)  python3 benchmarks/probe/bwd_sweep.py --out "$out" ;;
        bwd)    python3 benchmarks/probe/bwd_stages.py ;;
        decode) python3 benchmarks/gpu_decode.py --quick --out "$out" ;;
        decode-full) python3 benchmarks/gpu_decode.py --out "$out" ;;
        dplr)   python3 benchmarks/gpu_dplr_bench.py --out "$out" ;;
        pieces) # one long sequence in pieces that run at once, against whole sequences (at 64, 32 and 16
                # tokens a chunk) and fla (forward)
                python3 benchmarks/probe/variants.py --fwd default pieces2048 pieces4096 pieces8192 pieces16384 \
                    pieces4096_chunk64 pieces8192_chunk64 chunk32 chunk16 --fwd-shapes B1_T65536_H16 --train \
                    --json pieces.json --out "$out" ;;
        synthetic) # the report's synthetic tasks at its model size, lengths and learning rates, 600 steps
                python3 -m kda_explained.experiments.synthetic --preset gpu --jobs 6 --name synthetic_gpu \
                    --out "$out" ;;
        train-chunks) # the training step at 16 and 32 tokens a chunk against 64, beside fla
                python3 benchmarks/probe/variants.py --fwd --train default chunk32 chunk16 --json train_chunks.json \
                    --out "$out" ;;
        profile) python3 benchmarks/probe/train_profile.py ;;
        fwdprof) python3 benchmarks/probe/fla_profile.py --chunk-sizes 16 32 64 ;;
        *) echo "unknown step: $step (tests, tests-all, warm, wait-warm, tests-fwd, tests-bwd, check, decode-full, dplr, pieces, train-chunks, synthetic, stages, bench, train, sweep, bwd, decode," \
                "profile, fwdprof)"; exit 2 ;;
    esac
done
