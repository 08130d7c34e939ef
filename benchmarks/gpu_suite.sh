#!/usr/bin/env bash
# The GPU measurements behind the README's H100 rows, in priority order, each step time-boxed so one
# slow step cannot eat the others. Logs (and a tarball of the run directories) go to $OUT or ./runs/gpu.
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh            (STEPS="smollm2 compliance" runs only those)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
B=benchmarks/latency_model.py
step() {  # name, seconds, command...
    local name=$1 secs=$2; shift 2
    [[ " ${STEPS:-gpu_tests llama7b_graph smollm2 llama7b_eager compliance} " == *" $name "* ]] || return 0
    echo "=== $name ($(date +%T))"
    timeout "$secs" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/$name.log" | tail -40
    echo "=== $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
step gpu_tests 60 python3 -m pytest -q -m gpu tests/profiler -p no:cacheprovider
step llama7b_graph 200 python3 $B --shape llama7b --device cuda --regime decode:b1:ctx1024 --regime prefill:b1:s1024 \
    --repeat --min-time-ms 10 --energy-s 0.3 --out runs/gpu-llama7b-graph
step smollm2 ${SMOL_S:-300} python3 $B --shape smollm2 --device cuda --regime decode:b1:ctx1024:bfloat16:eager \
    --regime decode:b1:ctx1024 --regime prefill:b1:s1024:bfloat16:eager --regime prefill:b1:s1024 \
    --regime decode:b64:ctx1024 --regime prefill:b8:s1024 --e2e-random 16 --min-time-ms 5 --energy-s 0.2 --out runs/gpu-smollm2
step llama7b_eager 120 python3 $B --shape llama7b --device cuda --regime decode:b1:ctx1024:bfloat16:eager \
    --regime prefill:b1:s1024:bfloat16:eager --min-time-ms 10 --energy-s 0 --out runs/gpu-llama7b-eager
# Needs optuna (carry wheels where it is missing): the whole job, then every lookup config re-measured.
python3 -c "import optuna" 2>/dev/null && step compliance 250 python3 benchmarks/budget_compliance.py --device cuda \
    --shape smollm2 --regime prefill:b8:s1024 --out runs/gpu-compliance
tar czf "$OUT/runs.tgz" --exclude='parts' runs/gpu-* 2>/dev/null
ls -la "$OUT"
