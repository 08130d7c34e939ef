#!/usr/bin/env bash
# The GPU measurements behind the README's H100 rows, in priority order, each step time-boxed so one
# slow step cannot eat the others (in all at most 8 minutes). Logs (and a tarball of the run directories) go to $OUT or ./runs/gpu.
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh            (STEPS="smollm2 compliance" runs only those)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
B=benchmarks/latency_model.py
step() {  # name, seconds, command...
    local name=$1 secs=$2; shift 2
    [[ " ${STEPS:-gpu_tests smollm2 train ddp compliance llama7b_graph llama7b_eager} " == *" $name "* ]] || return 0
    echo "=== $name ($(date +%T))"
    timeout "$secs" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/$name.log" | tail -40
    echo "=== $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
step gpu_tests 45 python3 -m pytest -q -m gpu tests/profiler -p no:cacheprovider
step smollm2 ${SMOL_S:-150} python3 $B --shape smollm2 --device cuda --regime decode:b1:ctx1024:bfloat16:eager \
    --regime decode:b1:ctx1024 --regime prefill:b1:s1024:bfloat16:eager --regime prefill:b1:s1024 \
    --regime decode:b64:ctx1024 --regime prefill:b8:s1024 --e2e-random 16 --min-time-ms 5 --energy-s 0.2 --out runs/gpu-smollm2
# A short elastic training run on CUDA (bf16 autocast), then the same under torchrun with NCCL (one process
# per GPU; with one GPU this is the NCCL smoke: init, all-reduce of the gradients, rank-0 writes).
python3 -m flextron convert --model tiny-llama --out runs/gpu-train --calib-windows 2 >/dev/null 2>&1
step train 45 python3 -m flextron train --run runs/gpu-train --device cuda --steps 20 --batch-size 4 --seq-len 128 \
    --checkpoint-every 10
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
step ddp 45 torchrun --standalone --nproc-per-node "$NGPU" -m flextron -- train --run runs/gpu-train --device cuda \
    --steps 8 --batch-size "$((4 * NGPU))" --seq-len 128 --checkpoint-every 4 --restart
# Needs optuna (carry wheels where it is missing): the whole job, then every lookup config re-measured.
python3 -c "import optuna" 2>/dev/null && step compliance 90 python3 benchmarks/budget_compliance.py --device cuda \
    --shape smollm2 --regime prefill:b8:s1024 --out runs/gpu-compliance
step llama7b_graph 60 python3 $B --shape llama7b --device cuda --regime decode:b1:ctx1024 --regime prefill:b1:s1024 \
    --repeat --min-time-ms 10 --energy-s 0.3 --out runs/gpu-llama7b-graph
step llama7b_eager 40 python3 $B --shape llama7b --device cuda --regime decode:b1:ctx1024:bfloat16:eager \
    --regime prefill:b1:s1024:bfloat16:eager --min-time-ms 10 --energy-s 0 --out runs/gpu-llama7b-eager
tar czf "$OUT/runs.tgz" --exclude='parts' runs/gpu-* 2>/dev/null
ls -la "$OUT"
