#!/usr/bin/env bash
# One batched GPU session (the device machine has torch but not deepspeed/POT/webdataset: they travel as
# wheels in .whl/, see docs/development.md). Writes logs and result JSON under $OUT (or ./gpu-out).
#   bash benchmarks/gpu_session.sh tests model   # GPU tests + model benchmark (~5 min)
#   bash benchmarks/gpu_session.sh sweep         # MFU sweep of S (benchmarks/mfu_sweep.py, ~8 min)
#   bash benchmarks/gpu_session.sh fidelity      # issue #16's GPU budget: S, bf16 (configs/train/fidelity-gpu.yaml)
# With no stage named, tests, model and sweep run (more than one 10-minute device call). The fidelity stage
# fits one 10-minute call with STEPS=10000 (the default: ~1 min of data, ~0.5 of compilation, ~6.7 of
# training at an estimated 40 ms per step, ~1 of evaluation with the classifiers on the GPU); the full
# 8-minute budget is STEPS=12000 where a call may run longer. Its curve rows give the measured step rate.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export MLFLOW_DISABLE_TELEMETRY=true ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
run() { local name=$1; shift; echo "=== $name: $*"; timeout "${T:-240}" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40; }
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests model sweep)
for stage in "${stages[@]}"; do
  case $stage in
    tests) T=150 run gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/platform tests/training tests/contracts ;;
    model) T=150 run model_bench python3 benchmarks/model.py --device cuda --flavors debug S --out "$OUT/model.json" ;;
    sweep) T=560 run mfu_sweep python3 benchmarks/mfu_sweep.py --device cuda --no-sdpa --budget-s 500 --out "$OUT/sweep.json" ;;
    fidelity)  # the run (shards, checkpoints) stays on the machine; the report, plots and JSON come back
      T=590 run fidelity python3 benchmarks/fidelity.py --config configs/train/fidelity-gpu.yaml --device cuda \
        --steps "${STEPS:-10000}" --n-train 50000 --points 2 --curve-n 1000 \
        --out-dir caloforge-home/fidelity-gpu --results "$OUT/fidelity.json"
      mkdir -p "$OUT/fidelity" && cp -r caloforge-home/fidelity-gpu/report caloforge-home/fidelity-gpu/*.png \
        caloforge-home/fidelity-gpu/fidelity.json "$OUT/fidelity/" ;;
    *) echo "unknown stage $stage (tests, model, sweep, fidelity)"; exit 2 ;;
  esac
done
echo done
