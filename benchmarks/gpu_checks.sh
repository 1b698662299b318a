#!/usr/bin/env bash
# GPU checks of the library, as one prepared script for a lent GPU machine.
#   bash benchmarks/gpu_checks.sh            (outputs under $OUT, default ./gpu_out)
# 1. the CUDA-marked tests (tests/test_cuda.py: stages on cuda:0 against CPU runs and the
#    sequential oracle, foreach prediction on CUDA against the fallback rule, no host sync,
#    stream overlap); 2. the whole CPU suite under that machine's torch (compatibility);
# 3. benchmarks on cuda: prediction bandwidth (foreach chain and the fused probe), pipeline
#    step time at two work sizes, utilisation against the schedule's ideal.
# Every step runs even if an earlier one failed; the script exits non-zero if any did. Each
# benchmark writes a markdown section (command, date, device) to copy into benchmarks/RESULTS.md.
# Python packages missing there (torch_optimizer) can be carried as wheels in .whl/.
set -u
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT CMD...: run with a timeout, log to $OUT/NAME.txt, show its tail
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1 || { echo "FAILED($?): $name"; status=1; }
    echo "== $name ($((SECONDS - t0)) s)"; tail -n 4 "$OUT/$name.txt"
}
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name())"; } \
    > "$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"

step pytest_cuda 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
step pytest_all 150 "$PY" -m pytest -q -x -m "not cuda" tests -p no:cacheprovider
step predict_bandwidth 90 "$PY" benchmarks/predict_bandwidth.py --device cuda --params 50e6 --tensors 200 \
    --repeats 20 --write "$OUT/RESULTS_gpu.md"
step predict_bandwidth_1e9 90 "$PY" benchmarks/predict_bandwidth.py --device cuda --params 1e9 --tensors 200 \
    --repeats 10 --write "$OUT/RESULTS_gpu.md"
step fused_probe 120 "$PY" benchmarks/gpu_fused_probe.py --device cuda --params 50e6 --tensors 200
step fused_probe_1e9 90 "$PY" benchmarks/gpu_fused_probe.py --device cuda --params 1e9 --tensors 200 --repeats 10
for cfg in "adam 128" "adam 2048" "sgdm 2048"; do
    set -- $cfg
    step "pipeline_step_$1_$2" 90 "$PY" benchmarks/pipeline_step.py --device cuda --width 4096 --layers 2 \
        --batch "$2" --minibatches 16 --repeats 5 --optimizer "$1" --write "$OUT/RESULTS_gpu.md"
done
step utilisation 90 "$PY" benchmarks/utilisation.py --device cuda --write "$OUT/RESULTS_util.md"
exit $status
