#!/usr/bin/env bash
# GPU checks of the pipeline runtime, as one prepared script for a lent GPU machine.
#   bash benchmarks/gpu_checks.sh            (outputs under $OUT, default ./gpu_out)
# Runs the CUDA-marked tests, then the pipeline step benchmark and the prediction bandwidth
# benchmark on cuda, each with its own log; every step runs even if an earlier one failed,
# and the script exits non-zero if any did. Append the sections it writes to
# benchmarks/RESULTS.md (they carry command, date and device).
set -u
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PY:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
status=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count())" \
    > "$OUT/torch.txt" 2>&1 || status=1

timeout 300 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    > "$OUT/pytest_cuda.txt" 2>&1 || status=1
tail -n 3 "$OUT/pytest_cuda.txt"

timeout 150 "$PY" benchmarks/pipeline_step.py --device cuda --width 4096 --layers 2 --batch 128 \
    --minibatches 16 --repeats 5 --optimizer adam --write "$OUT/RESULTS_pipeline_step.md" \
    > "$OUT/pipeline_step.txt" 2>&1 || status=1
timeout 150 "$PY" benchmarks/predict_bandwidth.py --device cuda --params 1e9 --tensors 200 --repeats 10 \
    --write "$OUT/RESULTS_predict_bandwidth.md" > "$OUT/predict_bandwidth.txt" 2>&1 || status=1
grep -h "pipeoptim / pipedream" "$OUT/pipeline_step.txt" || true
exit $status
