#!/usr/bin/env bash
# One batched GPU session (the device machine has torch but not deepspeed/POT/webdataset: they travel as
# wheels in .whl/, see docs/development.md). Writes logs and result JSON under $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export MLFLOW_DISABLE_TELEMETRY=true ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
run() { local name=$1; shift; echo "=== $name: $*"; timeout "${T:-240}" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40; }
T=150 run model_bench python3 benchmarks/model.py --device cuda --flavors debug S --out "$OUT/model.json"
T=200 run pretrain_engine python3 benchmarks/pretrain_scaling.py --device cuda --skip-ray
T=120 run gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/platform tests/training tests/contracts
cp benchmarks/results/*.json "$OUT/" 2>/dev/null
echo done
