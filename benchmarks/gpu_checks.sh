#!/usr/bin/env bash
# GPU checks of the library, as one prepared script for a lent GPU machine.
#   bash benchmarks/gpu_checks.sh            (outputs under $OUT, default ./gpu_out)
# 1. the CUDA-marked tests (tests/test_cuda.py: stages on cuda:0 against CPU runs and the
#    sequential oracle, foreach prediction on CUDA against the fallback rule, no host sync,
#    stream overlap); 2. the whole CPU suite under that machine's torch (compatibility);
# 3. benchmarks on cuda: prediction bandwidth (foreach chain and the fused probe), pipeline
#    step time at two work sizes, utilisation against the schedule's ideal (default hardware
#    queues, then CUDA_DEVICE_MAX_CONNECTIONS=32).
# Every step runs even if an earlier one failed; the script exits non-zero if any did. All
# output goes to $OUT/log.txt; each benchmark also writes a markdown section (command, date,
# device) to $OUT/RESULTS_*.md, to copy into benchmarks/RESULTS.md.
# Python packages missing there (torch_optimizer) can be carried as wheels in .whl/.
# STEPS="pytest_cuda predict_bandwidth" runs only the steps named (default: all).
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
selected() {  # a step runs when STEPS is empty or one of its words starts the step's name
    [ -z "${STEPS:-}" ] && return 0
    local w; for w in $STEPS; do [[ $1 == "$w"* ]] && return 0; done; return 1
}
step() {  # step NAME TIMEOUT CMD...: run with a timeout, append its output to $OUT/log.txt
    local name=$1 limit=$2; shift 2
    selected "$name" || return 0
    local t0=$SECONDS
    echo "===== $name: $*" >> "$OUT/log.txt"
    timeout "$limit" "$@" > "$OUT/step.txt" 2>&1 || { echo "FAILED($?): $name"; status=1; }
    echo "== $name ($((SECONDS - t0)) s)"; tail -n 4 "$OUT/step.txt"
    cat "$OUT/step.txt" >> "$OUT/log.txt"; rm -f "$OUT/step.txt"
}
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name())"; } \
    > "$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"

step pytest_cuda 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
step pytest_all 150 "$PY" -m pytest -q -x -m "not cuda" tests -p no:cacheprovider
for size in 50e6 1e9; do
    for k in auto foreach; do  # auto: the fused Triton kernel; foreach: the multi-tensor chain
        step "bandwidth_${k}_$size" 60 "$PY" benchmarks/predict_bandwidth.py --device cuda --params "$size" \
            --tensors 200 --repeats 20 --kernel "$k" --write "$OUT/RESULTS_gpu.md"
    done
done
for cfg in "adam 128" "sgdm 128" "adam 2048" "sgdm 2048"; do
    set -- $cfg
    step "pipeline_step_$1_$2" 90 "$PY" benchmarks/pipeline_step.py --device cuda --width 4096 --layers 2 \
        --batch "$2" --minibatches 16 --repeats 5 --optimizer "$1" --write "$OUT/RESULTS_gpu.md"
done
# the small, host-bound size again with many rounds of only async/pipedream/pipeoptim: the
# per-round ratios' median and quartiles settle what single 5-round runs (1.01 vs 1.18) could not
for opt in adam sgdm; do
    step "pipeline_step_${opt}_128_rounds" 120 "$PY" benchmarks/pipeline_step.py --device cuda --width 4096 \
        --layers 2 --batch 128 --minibatches 16 --repeats 41 --methods async --optimizer "$opt" \
        --write "$OUT/RESULTS_gpu.md"
done
step utilisation 90 "$PY" benchmarks/utilisation.py --device cuda --write "$OUT/RESULTS_util.md"
# the same with more hardware queues than streams (depth 8 uses more streams than the default 8)
step utilisation_conn32 90 env CUDA_DEVICE_MAX_CONNECTIONS=32 "$PY" benchmarks/utilisation.py --device cuda \
    --write "$OUT/RESULTS_util_conn32.md"
# the GPT-style training example at GPT-2-small size (12 layers, d=768, context 1024), 4 stages
# sharing cuda:0, pipedream / pipeoptim / pipeoptim-calroll (recommended), 200 minibatches each:
# tokens/s and peak GPU memory per method in $OUT/train_lm/results.md (checkpoints kept off $OUT)
step gpu_examples 480 "$PY" examples/train_lm.py --size gpt2-small --devices cuda:0,cuda:0,cuda:0,cuda:0 \
    --method pipedream,pipeoptim,pipeoptim-calroll --max-steps 200 --no-progress --out "$OUT/train_lm" \
    --ckpt-dir /tmp/train_lm_ckpt
exit $status
