#!/usr/bin/env bash
# Sets up .venv (torch, the package with its native kernels, test tools) and runs one job:
#   bash scripts/dev.sh main        the main job: pyunlearn demo (train on digits, record, forget)
#   bash scripts/dev.sh test        the whole test suite, as CI runs it
#   bash scripts/dev.sh test-fast   the suite without the tests marked slow (the SIGKILL harness, the nvcc build,
#                                   the benchmark smoke runs, the multi-process DDP and torchrun tests)
#   bash scripts/dev.sh test-slow   the slow tests only
#   bash scripts/dev.sh bench       the kernel and store benchmarks (write benchmarks/results/)
# Works on a fresh clone: needs python3 (3.10+) with venv, and a C++17 compiler with OpenMP.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
job="${1:-main}"
shift || true
say() { echo "dev.sh: $*" >&2; }
case "$job" in
    main|test|test-fast|test-slow|bench) ;;
    *) echo "unknown job '$job': use main, test, test-fast, test-slow or bench" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

# torch first, spelled exactly: a CPU wheel of 2.13.0 lies on this kind of machine, and any
# other spelling (or letting the package's `torch>=2.1` pull it) fetches a multi-GB CUDA build.
# Where the venv already imports a torch, it is left alone.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    say "installing torch==2.13.0 (CPU)"
    "${PIP[@]}" "torch==2.13.0"
fi

# The main job needs the package alone; the test jobs also the test extra (Lightning,
# transformers, moto, tensorstore...: most of the download). An install is skipped when the
# files it depends on (and the extra) are what the last one in this venv installed.
case "$job" in main) extra="" ;; *) extra="[test]" ;; esac
stamp="$VENV/.pyunlearn-install"
want="$(find pyproject.toml setup.py csrc -type f | LC_ALL=C sort | xargs cat | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
have_extra() { grep -qxF "$1 $want" "$stamp" 2>/dev/null; }
if have_extra "$extra" || { [ -z "$extra" ] && have_extra "[test]"; }; then
    say "the package$extra is installed and up to date: skipping pip"
else
    say "installing the package$extra (builds the native kernels)"
    "${PIP[@]}" "setuptools>=64" wheel "pybind11>=2.12" numpy
    # No build isolation: the build needs only setuptools + pybind11 (just installed), never torch.
    "${PIP[@]}" --no-build-isolation -e ".$extra"
    echo "$extra $want" >> "$stamp"
fi

# The tests run on every core, up to 4 (pytest-xdist); `-n 0` after the job runs them in this
# process, one after another. (pytest-xdist's --dist loadgroup does not group tests under pytest
# 9 here: expensive fixtures that several workers need are made once, tests/support/shared.py.)
cores="$(nproc 2>/dev/null || echo 1)"
workers=$(( cores < 4 ? cores : 4 ))
PYTEST=("$PY" -m pytest -q)
if [ "$workers" -gt 1 ]; then
    PYTEST+=(-n "$workers")
    # One torch/OpenMP thread per worker unless asked otherwise: with more, the threads outnumber
    # the cores and spin waiting for each other (on 2 cores the suite then did half as much work
    # again, and took longer than with one thread per worker).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

case "$job" in
    main) "$VENV/bin/pyunlearn" selfcheck && exec "$VENV/bin/pyunlearn" demo "$@" ;;
    test) exec "${PYTEST[@]}" "$@" ;;
    test-fast) exec "${PYTEST[@]}" -m "not slow" "$@" ;;
    test-slow) exec "${PYTEST[@]}" -m slow "$@" ;;
    bench) "$PY" benchmarks/bench_kernels.py "$@" && exec "$PY" benchmarks/bench_store.py ;;
    *) echo "unknown job '$job': use main, test, test-fast, test-slow or bench" >&2; exit 2 ;;
esac
