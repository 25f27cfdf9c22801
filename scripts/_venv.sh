# Sourced by demo.sh and test.sh (not run on its own): use the repository's .venv, creating it
# if it is missing, and install what the command needs.
#
# torch comes first and pinned, torch==2.13.0: on a machine without a GPU an unpinned install
# may pull a multi-GB CUDA build. The package itself leaves torch unpinned (pip install -e
# ".[torch]" on a GPU machine keeps the CUDA torch already there). pip skips what is satisfied.

ensure_venv() {
    local extras=$1
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with python3 -m venv"
        python3 -m venv .venv
    fi
    export VIRTUAL_ENV="$PWD/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
    hash -r
    echo "installing into .venv: torch==2.13.0, then kda-explained[$extras] (editable)"
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[$extras]"
}

# Set TRITON_INTERPRET=1 when there is no CUDA GPU, so Triton kernels run on the CPU.
use_triton_interpreter_without_gpu() {
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        export TRITON_INTERPRET=1
        echo "no CUDA GPU: TRITON_INTERPRET=1 (Triton kernels run under the interpreter)"
    fi
}
