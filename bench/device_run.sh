#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, `.device` carried:
#   bash bench/device_run.sh tests [K]        GPU tests (pytest -k K); SAVE_CACHE=1: flashinfer kernels -> $OUT/fi-cache.txz
#   bash bench/device_run.sh bench [PARTS]    engine benchmarks (decode,decode-loop,prefill,switch,offline; also contention) -> $OUT/engine.{md,json}
#                                             DECODE_ATTENTION=fa2,fa3: the decode table and the unified offline job per kernel
#   bash bench/device_run.sh attention        flashinfer's decode-attention kernels side by side -> $OUT/attention.json
#   bash bench/device_run.sh vllm             vLLM reference of the offline job and the decode step (after staging .vllmA)
#                                             PROFILE_VLLM=1: and its kernel tables, as offline-profile's
#   bash bench/device_run.sh profile [BATCH..] where a decode step's time goes -> $OUT/decode-profile.log
#   bash bench/device_run.sh offline-profile  the offline job's GPU time by kernel kind -> $OUT/offline-profile.log
#   bash bench/device_run.sh gemm             one layer's GEMMs on each split, cuBLAS sized for the GPU vs the partition -> $OUT/gemm.json
#   bash bench/device_run.sh startup          semi-PD engine start-up and latency-profile times -> $OUT/startup.log
#   bash bench/device_run.sh stalls [OPTIONS] decode's stalls on a fresh engine's first load (warm-up draws or not, lazy or
#                                             eager module loading: bench/stall_probe.py's options) -> $OUT/stalls.log
#   bash bench/device_run.sh jit-build        flashinfer's kernels built side by side, as an engine starts -> $OUT/jit-build.log
#   bash bench/device_run.sh stream-probe     chunks/s one Ray actor streams, and its CPU per chunk -> $OUT/stream-probe.log
#   bash bench/device_run.sh structured       structured outputs' host and device cost per decode step -> $OUT/structured-cost.md
# Logs go to $OUT; the last lines printed are a short table. `.device`: see bench/device_env.sh.
set -uo pipefail
what=${1:-tests}
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
mkdir -p /tmp/models
model=/tmp/models/llama3-8b
[ -f $model/config.json ] || python3 -m cluster.cli make-model --preset llama3-8b --out $model --no-weights >/dev/null
save_cache() {  # SAVE_CACHE=1: flashinfer's compiled kernels -> $OUT/fi-cache.txz (for .device/)
  [ "${SAVE_CACHE:-0}" = 1 ] || return 0
  bash .device/save-cache.sh >/dev/null && xz -T0 "$OUT/fi-cache.tar" && mv "$OUT/fi-cache.tar.xz" "$OUT/fi-cache.txz"
}
case $what in
  tests)
    # a test still running after 120 s dumps every thread's stack into the log (how the disagg test's hang was found)
    python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider --durations=8 -o faulthandler_timeout=120 \
      ${2:+-k "$2"} 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
    save_cache
    ;;
  bench)
    python3 -m cluster.cli bench engine --model $model --parts "${2:-decode,decode-loop,prefill,switch,offline}" \
      ${VLLM_JSON:+--vllm-json $VLLM_JSON} ${DECODE_ATTENTION:+--decode-attention $DECODE_ATTENTION} --out "$OUT/engine.md" 2>&1 | tee "$OUT/bench.log" | tail -60
    save_cache
    ;;
  profile)
    python3 bench/decode_profile.py $model ${@:2} > "$OUT/decode-profile.log" 2>&1; tail -8 "$OUT/decode-profile.log"
    ;;
  offline-profile)
    python3 bench/offline_profile.py $model > "$OUT/offline-profile.log" 2>&1; tail -64 "$OUT/offline-profile.log"
    ;;
  attention)
    python3 bench/attention_decode.py "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -20
    ;;
  gemm)
    python3 bench/partition_gemm.py "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.log" | tail -17
    ;;
  startup)
    python3 bench/startup_probe.py $model 2>&1 | tee "$OUT/startup.log" | grep -E "captured|built|profile in"
    ;;
  stalls)
    python3 bench/stall_probe.py $model "${@:2}" 2>&1 | tee "$OUT/stalls.log" | tail -6
    ;;
  jit-build)  # the machine's memory in use is sampled every 2 s while it builds: its peak is the last line
    (while sleep 2; do free -m | awk '/^Mem:/ {print $3}'; done) > "$OUT/jit-build-mem.log" &
    trap "kill $! 2>/dev/null" EXIT  # also when a timeout ends this script mid-build
    python3 bench/jit_build_probe.py $model 2>&1 | tee "$OUT/jit-build.log" | grep -E "^\||Building"
    echo "machine memory in use while building, peak: $(sort -n "$OUT/jit-build-mem.log" | tail -1) MiB (MAX_JOBS=$MAX_JOBS)"
    ;;
  stream-probe)
    python3 bench/ray_stream_probe.py 2>&1 | tee "$OUT/stream-probe.log" | grep "^|"
    ;;
  structured)  # needs llguidance: after a vLLM staging (bench/device_env.sh)
    python3 bench/structured_cost.py $model --out "$OUT/structured-cost.md" 2>&1 | tail -16
    ;;
  vllm)
    source .vllmB/setup-vllm.sh
    vllm-python bench/vllm_offline.py $model "$OUT/vllm.json" ${PROFILE_VLLM:+/tmp/vllm-trace} > "$OUT/vllm.log" 2>&1
    lines=3; [ -n "${PROFILE_VLLM:-}" ] && lines=70
    tail -$lines "$OUT/vllm.log"
    ;;
esac
