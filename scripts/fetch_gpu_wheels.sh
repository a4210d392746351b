#!/usr/bin/env bash
# Fetches, on a machine with the package registries, the wheels that scripts/gpu_check.sh
# installs on a GPU machine without network: the runtime dependencies of pyunlearn that the GPU
# image lacks (zarr and what zarr and numcodecs need beyond numpy, packaging, typing-extensions
# and pyyaml, which the image has), for CPython 3.12 on manylinux x86-64, into .whl/ beside the
# repository root (ignored by git; carry it to the GPU machine with the tree).
#   bash scripts/fetch_gpu_wheels.sh            the default set
#   EXTRA="pybind11 hypothesis" bash scripts/fetch_gpu_wheels.sh   plus these (latest versions)
# Versions are those installed in .venv when it exists (what CI tests), else the pins below.
# Only binary wheels, no dependencies resolved: each one needed is named here.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || PY="${PYTHON:-python3}"

# name  fallback version (zarr 3.1: donfig, google-crc32c, numcodecs, numpy, packaging,
# typing-extensions; numcodecs 0.16: numpy, typing-extensions; donfig: pyyaml)
PACKAGES=(
    "zarr 3.1.6"
    "numcodecs 0.16.6"
    "donfig 0.8.1.post1"
    "google-crc32c 1.9.0"
)

installed_version() {
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true
}

specs=()
for entry in "${PACKAGES[@]}"; do
    read -r name pin <<<"$entry"
    version="$(installed_version "$name")"
    specs+=("$name==${version:-$pin}")
done
for name in ${EXTRA:-}; do
    specs+=("$name")
done

mkdir -p .whl
# One version of each: an older wheel of the same name would make the install fail there.
for spec in "${specs[@]}"; do
    stem="${spec%%==*}"
    stem="${stem//-/_}"
    rm -f .whl/"$stem"-*.whl .whl/"${stem//_/-}"-*.whl
done

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "${specs[@]}"
echo "wheels in .whl/ for the GPU machine (Python 3.12, x86-64):"
ls -1 .whl
