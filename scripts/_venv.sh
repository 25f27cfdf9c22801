# Sourced by demo.sh and test.sh (not run on its own): use the repository's .venv, creating it
# if it is missing, and install what the command needs.
#
# torch comes first and pinned, torch==2.13.0. On a machine without an NVIDIA GPU it comes from
# PyTorch's CPU wheel index when that index answers within a few seconds: the default index's
# Linux build bundles the CUDA libraries, several GB that such a machine never uses. If the CPU
# index cannot be reached (or its install fails), the default index is used and the script says
# so. With an NVIDIA GPU the default index's build is the one wanted. Either way the script
# prints the torch it ended with. The package itself leaves torch unpinned (pip install -e
# ".[torch]" on a GPU machine keeps the CUDA torch already there). pip skips what is satisfied.

TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ensure_venv() {
    local extras=$1
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with python3 -m venv"
        python3 -m venv .venv
    fi
    export VIRTUAL_ENV="$PWD/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
    hash -r
    install_torch
    echo "installing into .venv: kda-explained[$extras] (editable)"
    python -m pip install -q -e ".[$extras]"
}

# torch==$TORCH_VERSION into the active environment, unless a build of that version is there.
install_torch() {
    if python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$TORCH_VERSION')" \
        2>/dev/null; then
        echo "torch already installed: $(torch_build)"
        return
    fi
    if has_nvidia_gpu; then
        echo "installing into .venv: torch==$TORCH_VERSION from the default index (an NVIDIA GPU is present)"
        python -m pip install -q "torch==$TORCH_VERSION"
    elif index_reachable "$TORCH_CPU_INDEX/torch/" \
        && echo "installing into .venv: torch==$TORCH_VERSION, CPU build, from $TORCH_CPU_INDEX" \
        && python -m pip install -q --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; then
        :
    else
        echo "PyTorch's CPU wheel index is not reachable (or its install failed): installing"
        echo "torch==$TORCH_VERSION from the default index, which may be a CUDA build of several GB"
        python -m pip install -q "torch==$TORCH_VERSION"
    fi
    echo "torch: $(torch_build)"
}

# nvidia-smi lists a GPU (the driver is installed and sees one).
has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# The URL answers within 5 seconds (a short probe, so that an unreachable index costs no pip timeout).
index_reachable() {
    python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" >/dev/null 2>&1
}

# "2.13.0+cpu (CPU build)" or "2.13.0+cu130 (CUDA 13.0 build)": which torch the environment has.
torch_build() {
    python -W ignore -c "import torch; c = torch.version.cuda; print(torch.__version__, f'(CUDA {c} build)' if c else '(CPU build)')"
}

# Set TRITON_INTERPRET=1 when there is no CUDA GPU, so Triton kernels run on the CPU.
use_triton_interpreter_without_gpu() {
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        export TRITON_INTERPRET=1
        echo "no CUDA GPU: TRITON_INTERPRET=1 (Triton kernels run under the interpreter)"
    fi
}
