#!/usr/bin/env bash
# Download (into .whl/) the wheels of qgseg's dependencies that the lent GPU machine's image lacks, at the
# versions installed in this checkout's .venv, for that machine's Python (default 3.12, x86-64 Linux).
# The image has torch, torchvision, timm, typer, rich, pandas, scipy, opencv and matplotlib; it lacks
# segmentation-models-pytorch, albumentations (and albucore, pydantic, simsimd, stringzilla) and monai.
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # then carry ".whl" and, on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/qgseg-site .whl/*.whl
#   export PYTHONPATH=$PWD:/tmp/qgseg-site NO_ALBUMENTATIONS_UPDATE=1
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-.venv/bin/python}
PKGS="segmentation-models-pytorch albumentations albucore pydantic pydantic-core annotated-types typing-inspection simsimd stringzilla monai"
PLATS=""
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATS="$PLATS --platform $p"
done
mkdir -p .whl
for pkg in $PKGS; do
  ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg") \
    || { echo "gpu_wheels: $pkg is not installed in $PY; run the README's setup first" >&2; exit 3; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    $PLATS -d .whl "$pkg==$ver"
done
ls .whl
du -sh .whl
