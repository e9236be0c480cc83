#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, `.device` carried:
#   bash bench/device_run.sh tests            GPU tests; saves flashinfer's compiled kernels to $OUT
#   bash bench/device_run.sh bench [PARTS]    engine benchmarks (decode,decode-loop,prefill,switch,offline) -> $OUT/engine.{md,json}
#   bash bench/device_run.sh vllm             vLLM reference of the offline job (after staging .vllmA)
#   bash bench/device_run.sh profile [BATCH..] where a decode step's time goes -> $OUT/decode-profile.log
#   bash bench/device_run.sh startup          semi-PD engine start-up and latency-profile times -> $OUT/startup.log
# Logs go to $OUT; the last lines printed are a short table.
set -uo pipefail
what=${1:-tests}
source .device/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
mkdir -p /tmp/models
model=/tmp/models/llama3-8b
[ -f $model/config.json ] || python3 -m cluster.cli make-model --preset llama3-8b --out $model --no-weights >/dev/null
bench_engine() {
  python3 - "$@" <<'PY'
import argparse, sys
from cluster.commands import bench_engine
parser = argparse.ArgumentParser(prog="semipd bench")
bench_engine.register_engine(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
PY
}
case $what in
  tests)
    python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider ${2:+-k "$2"} 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
    bash .device/save-cache.sh >/dev/null && split -b 15M "$OUT/fi-cache.tar" "$OUT/fi-cache.part." && rm "$OUT/fi-cache.tar"
    ;;
  bench)
    bench_engine engine --model $model --parts "${2:-decode,decode-loop,prefill,switch,offline}" \
      ${VLLM_JSON:+--vllm-json $VLLM_JSON} --out "$OUT/engine.md" 2>&1 | tee "$OUT/bench.log" | tail -60
    bash .device/save-cache.sh >/dev/null && split -b 15M "$OUT/fi-cache.tar" "$OUT/fi-cache.part." && rm "$OUT/fi-cache.tar"
    ;;
  profile)
    python3 bench/decode_profile.py $model ${@:2} > "$OUT/decode-profile.log" 2>&1; tail -8 "$OUT/decode-profile.log"
    ;;
  startup)
    python3 bench/startup_probe.py $model 2>&1 | tee "$OUT/startup.log" | grep -E "captured|built|profile in"
    ;;
  vllm)
    source .vllmB/setup-vllm.sh
    vllm-python bench/vllm_offline.py $model "$OUT/vllm.json" > "$OUT/vllm.log" 2>&1; tail -3 "$OUT/vllm.log"
    ;;
esac
