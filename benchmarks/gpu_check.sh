#!/usr/bin/env bash
# GPU step-time check (under 5 minutes on one GPU): sup / pl / pl --qw / mt / mt --qw / qar (+ sup-LU, sup with
# the labeled + unlabeled images in one batch) at 224 px with unetpp (resnet34), labeled/unlabeled
# batch 32/64 (the paper's), bf16 autocast, channels_last; prints the step-time table (ratios vs
# sup, images per second, data-wait share, peak GPU memory), then the same with
# torch.backends.cudnn.benchmark on. JSON files go to $OUT (default /tmp/qgseg-gpu-check).
#
#   benchmarks/gpu_check.sh                        # on the GPU machine
#   benchmarks/gpu_check.sh --device cpu --quick   # the same code path on a CPU (32 px, batch 2/4)
#
# Self-contained: runs from this checkout (PYTHONPATH, no install needed). The GPU machine has torch
# but no internet; segmentation-models-pytorch is not in its image: carry its wheel in .whl/
# (benchmarks/gpu_wheels.sh downloads it and the other missing dependencies; then carry ".whl");
# this script installs carried wheels into /tmp/qgseg-site when a package is
# missing and stops with exit 3 and the list of what is still missing otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
OUTDIR=${OUT:-/tmp/qgseg-gpu-check}
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    --out) OUTDIR=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

missing() {
  "$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "numpy": "numpy", "cv2": "opencv-python-headless", "PIL": "pillow", "pandas": "pandas",
        "scipy": "scipy", "rich": "rich", "timm": "timm", "segmentation_models_pytorch": "segmentation-models-pytorch",
        "huggingface_hub": "huggingface-hub", "safetensors": "safetensors", "torchvision": "torchvision", "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check: missing $MISSING; installing the wheels carried in .whl/ into /tmp/qgseg-site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qgseg-site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/qgseg-site
  MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
  echo "gpu_check: missing Python packages: $MISSING" >&2
  echo "  this machine cannot download them: on a machine with internet run" >&2
  echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl $MISSING" >&2
  echo "  and carry .whl with the checkout" >&2
  exit 3
fi
"$PY" -c "import qgseg.ssl, qgseg.models" || { echo "gpu_check: cannot import qgseg from $PWD" >&2; exit 3; }
if [ "$DEVICE" != cpu ]; then
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: torch sees no CUDA device; for the CPU path use --device cpu --quick" >&2; exit 3; }
  nvidia-smi -L 2>/dev/null || true
fi

if [ "$QUICK" = 1 ]; then  # a smoke run of the same code path (bf16 autocast is slow on CPUs without AMX)
  SIZE=32; BATCH="2 4"; TIMING="--steps 1 --rounds 2 --warmup 1"; LIMIT=900
else
  SIZE=224; BATCH="32 64"; TIMING="--steps 5 --rounds 3 --warmup 3"; LIMIT=135
fi
mkdir -p "$OUTDIR"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| threads', torch.get_num_threads())"

status=0
for CB in "" "--cudnn-benchmark"; do
  NAME=gpu_check${CB:+_cudnn_benchmark}
  echo "== unetpp ${SIZE} px, batch ${BATCH/ /\/}, bf16, channels_last${CB:+, cudnn.benchmark} on $DEVICE"
  # shellcheck disable=SC2086
  if ! timeout "$LIMIT" "$PY" benchmarks/run.py --sections steps --device "$DEVICE" --arch unetpp --encoder resnet34 \
      --image-size "$SIZE" --batch $BATCH --precision bf16 --channels-last --metric wall \
      --methods sup pl pl-qw mt mt-qw qar sup-LU $TIMING $CB --out "$OUTDIR/$NAME.json"; then
    echo "gpu_check: the run above failed or passed its ${LIMIT} s limit" >&2
    status=1
  else
    "$PY" benchmarks/gpu_summary.py "$OUTDIR/$NAME.json"
  fi
  if [ "$DEVICE" = cpu ]; then break; fi  # cudnn.benchmark means nothing on the CPU
done
exit $status
