#!/usr/bin/env bash
# The prepared GPU check (issue 16), for a machine with a CUDA GPU, CUDA torch (2.11, Python
# 3.12) and nvcc, but no network and no zarr/numcodecs:
#   bash scripts/gpu_check.sh OUTDIR
# 1. installs the wheels in .whl/ (fetched beforehand by scripts/fetch_gpu_wheels.sh) into a
#    private folder put on PYTHONPATH;
# 2. builds pyunlearn with its CUDA module (PYUNLEARN_CUDA=1 pip install -e .; a failed build
#    stops the check: nothing else would mean anything);
# 3. runs the CUDA kernel tests on the GPU (all of them, without -x: every failure is listed),
#    then the device-path tests' CUDA cases (recording, forgetting, the methods and metrics with
#    the model on the GPU, the ops device path against the CPU kernels, no stream synchronization
#    while recording), then the rest of the suite with the CUDA cases on (pytest -x; S3 tests
#    skip without moto, slow tests are excluded as in CI);
# 4. runs benchmarks/bench_gpu.py.
# Writes into OUTDIR: gpu_check.log (everything), pytest-cuda.log, pytest-device.log, pytest.log, bench.log,
# gpu.json (the benchmark's results) and summary.txt (one line per step). Exit status 0 only if
# every step passed. Each step has a time limit (seconds, overridable) so the whole check ends
# within 9 minutes on an H200 (530 s at most): BUILD_LIMIT_S=120, CUDA_TEST_LIMIT_S=80,
# DEVICE_TEST_LIMIT_S=60, TEST_LIMIT_S=150, BENCH_LIMIT_S=120.
set -uo pipefail

OUT="${1:?usage: bash scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
SITE="${TMPDIR:-/tmp}/pyunlearn-gpu-site"
export PYTHONUNBUFFERED=1

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
: >"$OUT/summary.txt"
failed=0
started=$SECONDS

note() { echo "[gpu_check +$((SECONDS - started))s] $*"; }
record() {  # record STEP STATUS SECONDS DETAIL
    printf '%-12s %-6s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt"
    [ "$2" = ok ] || failed=1
}
finish() {
    note "done in $((SECONDS - started)) s; summary:"
    cat "$OUT/summary.txt"
    exit "$failed"
}

note "machine"
nvidia-smi -L 2>&1 || true
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
"${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" --version 2>&1 | tail -2 || true
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

# 1. wheels ------------------------------------------------------------------------------------
t=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        record wheels FAIL $((SECONDS - t)) "pip could not install .whl/*.whl"
    fi
fi
missing="$("$PY" -c "
import importlib.util
need = ['zarr', 'numcodecs', 'donfig', 'google_crc32c', 'numpy', 'sklearn', 'tqdm', 'pybind11', 'setuptools', 'pytest',
        'hypothesis', 'pytest_benchmark']
print(' '.join(n for n in need if importlib.util.find_spec(n) is None))")"
if [ -n "$missing" ]; then
    record wheels FAIL $((SECONDS - t)) "missing: $missing (bash scripts/fetch_gpu_wheels.sh where there is network, EXTRA= for more)"
    finish
fi
record wheels ok $((SECONDS - t)) "$(find .whl -type f -name '*.whl' -printf '%f ' 2>/dev/null)"

# 2. build -------------------------------------------------------------------------------------
t=$SECONDS
note "building pyunlearn with its CUDA module"
if PYUNLEARN_CUDA=1 timeout "${BUILD_LIMIT_S:-120}" "$PY" -m pip install --no-index --no-deps --no-build-isolation \
        --disable-pip-version-check -e . \
    && "$PY" -c "from pyunlearn.kernels import _native, _native_cuda; print('_native_cuda: CUDA runtime', _native_cuda.runtime_version())"; then
    record build ok $((SECONDS - t)) "pyunlearn.kernels._native and pyunlearn.kernels._native_cuda"
else
    record build FAIL $((SECONDS - t)) "see gpu_check.log"
    finish
fi

# 3. tests -------------------------------------------------------------------------------------
t=$SECONDS
note "CUDA kernel tests on the GPU (all of them, against the CPU kernels; the emulated backend runs in CI)"
timeout "${CUDA_TEST_LIMIT_S:-80}" "$PY" -m pytest -q -rs -p no:cacheprovider -k "not emulated" \
    tests/kernels/test_cuda_kernels.py tests/kernels/test_cuda_build.py 2>&1 | tee "$OUT/pytest-cuda.log"
rc=${PIPESTATUS[0]}
# The "cuda" backend must have run: its skips (no GPU, module not built) count as a failure here.
if [ "$rc" -eq 0 ] && ! grep -q "no CUDA device visible\|_native_cuda is not built" "$OUT/pytest-cuda.log"; then
    record cuda-tests ok $((SECONDS - t)) "$(tail -1 "$OUT/pytest-cuda.log")"
else
    record cuda-tests FAIL $((SECONDS - t)) "rc=$rc (124: time limit); $(tail -1 "$OUT/pytest-cuda.log")"
fi

t=$SECONDS
note "device-path tests on the GPU (their CUDA cases; the cpu-* cases run in the suite below and in CI)"
timeout "${DEVICE_TEST_LIMIT_S:-60}" "$PY" -m pytest -q -rs -p no:cacheprovider -k "(cuda or gpu) and not emulated" \
    tests/kernels/test_device_path.py tests/recording/test_devices.py tests/unlearn/test_devices.py \
    tests/evaluation/test_metrics.py 2>&1 | tee "$OUT/pytest-device.log"
rc=${PIPESTATUS[0]}
# They must have run on the GPU: a skip for want of one counts as a failure here.
if [ "$rc" -eq 0 ] && ! grep -q "no CUDA device visible" "$OUT/pytest-device.log"; then
    record device-tests ok $((SECONDS - t)) "$(tail -1 "$OUT/pytest-device.log")"
else
    record device-tests FAIL $((SECONDS - t)) "rc=$rc (124: time limit); $(tail -1 "$OUT/pytest-device.log")"
fi

t=$SECONDS
note "the test suite, CUDA cases on"
timeout "${TEST_LIMIT_S:-150}" "$PY" -m pytest -q -x -p no:cacheprovider \
    --deselect tests/kernels/test_cuda_kernels.py --deselect tests/kernels/test_cuda_build.py 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
    record tests ok $((SECONDS - t)) "$(tail -1 "$OUT/pytest.log")"
else
    record tests FAIL $((SECONDS - t)) "rc=$rc (124: time limit); $(tail -1 "$OUT/pytest.log")"
fi

# 4. benchmark ---------------------------------------------------------------------------------
t=$SECONDS
note "benchmarks/bench_gpu.py"
timeout "${BENCH_LIMIT_S:-120}" "$PY" benchmarks/bench_gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
    record bench ok $((SECONDS - t)) "gpu.json"
else
    record bench FAIL $((SECONDS - t)) "rc=$rc (124: time limit; 1: a part failed, see bench.log)"
fi

finish
