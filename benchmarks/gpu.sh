#!/usr/bin/env bash
# The GPU benchmark as one script, for a fresh GPU machine with no network:
#
#   benchmarks/gpu.sh WHEELS REPOSITORY DATA OUT [extra ctredge bench args]
#
# WHEELS      folder(s), colon-separated, holding the wheels that machine lacks (for its Python):
#             onnxruntime-gpu 1.31 (as a .whl, or as ort-gpu.tar.xz.part* = its unpacked tree, xz-compressed
#             and split so it fits a 64 MiB transfer), tritonclient, grpcio(-health-checking, -reflection),
#             protobuf, python-rapidjson; numpy, onnx, prometheus-client, matplotlib come from the image.
# REPOSITORY  a model repository from `ctredge compress all` (ctr-fp32 and ctr-fp16 are measured).
# DATA        a click log with the models' FeatureSpec (a few thousand rows are enough).
# OUT         where report.md, report.json, the plots and gpu.log go.
#
# It installs into a private folder (no root site-packages touched), puts the CUDA 13 / cuDNN 9 libraries
# of the image's nvidia-* packages (PyTorch's) on LD_LIBRARY_PATH, checks that ONNX Runtime really runs a
# session on CUDAExecutionProvider, then runs `ctredge bench --providers cpu,cuda`: in-process latency of
# ctr-fp32 (standing for the full model) and ctr-fp16 on CUDA against the CPU at batch 1/16/256/4096, and
# gRPC load on a CUDA server against a CPU server.  Budget: a few minutes (--seconds 1.5 per cell).
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,20p' "$0"; exit 2
fi
WHEELS=$1; REPO=$2; DATA=$3; OUT=$4; shift 4
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SITE=${CTREDGE_GPU_SITE:-/tmp/ctredge-gpu-site}
mkdir -p "$OUT" "$SITE"
REPO=$(cd "$REPO" && pwd); DATA=$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA"); OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu.log") 2>&1
T0=$(date +%s)
log() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }

log "python: $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/[nvidia-smi] /' || true

# 1. wheels -> $SITE
IFS=: read -r -a DIRS <<< "$WHEELS"
for d in "${DIRS[@]}"; do
    parts=("$d"/ort-gpu.tar.xz.part*)
    if [ -e "${parts[0]}" ]; then
        log "unpacking onnxruntime-gpu from ${#parts[@]} part(s) in $d"
        cat "${parts[@]}" | xz -d | tar -x -C "$SITE"
    fi
    whl=("$d"/*.whl)
    if [ -e "${whl[0]}" ]; then
        log "installing ${#whl[@]} wheel(s) from $d"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}"
    fi
done
log "installing ctredge from $HERE"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" "$HERE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$SITE"  # not the checkout: its ctredge/ (the hub alone) would shadow the installed package

# 2. CUDA 13 / cuDNN 9 from the image's nvidia-* wheels (onnxruntime-gpu silently falls back to the CPU without them)
LIBDIRS=$("$PY" - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pattern in ("libcublas*.so*", "libcudnn*.so*", "libcudart*.so*", "libcurand*.so*", "libcufft*.so*",
                    "libnvJitLink*.so*"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", pattern), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"

# 3. does a session really run on CUDA?
"$PY" - "$REPO" <<'EOF'
import sys, time
import numpy as np
import onnxruntime as ort
from ctredge.serve.runtime import create_session
from ctredge.serve.signature import CtrSignature
from ctredge.features import METADATA_KEY, FeatureSpec
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
path = f"{sys.argv[1]}/ctr-fp32/1/model.onnx"
sess, provider = create_session(path, providers=("cuda",), require_gpu=True, label="gpu check")
spec = FeatureSpec.from_json(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
feeds = CtrSignature(spec, 4096).warmup_feeds(seed=0)
cpu, _ = create_session(path, providers=("cpu",), label="cpu check")
a, b = sess.run(None, feeds)[0], cpu.run(None, feeds)[0]
print(f"session providers {sess.get_providers()}; max |cuda - cpu| = {float(np.abs(a - b).max()):.3g}")
EOF

# 4. the benchmark
log "ctredge bench --providers cpu,cuda"
"$PY" -m ctredge.cli bench --repository "$REPO" --data "$DATA" --out "$OUT" --models ctr-fp32,ctr-fp16 \
    --providers cpu,cuda --skip footprint,peer --seconds 1.5 --bootstrap 50 "$@"
log "done: $OUT/report.md"
