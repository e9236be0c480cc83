#!/usr/bin/env bash
# On the GPU machine: rate sweeps of `semipd bench serve` against several server configurations, one after
# the other on the same GPU, with the same requests and SLOs.
#   bash bench/gpu_serve_compare.sh CONFIG...
# CONFIG is one of:
#   semi-pd-dynamic   semi-PD, model-based split policy (profiles at start, or loads /tmp/semipd-profile.json)
#   semi-pd-pacedMS   semi-PD dynamic, decode paced to one step per MS ms while prefill has work (e.g. semi-pd-paced18)
#   semi-pd-reactive  semi-PD, the paper's reactive P90 rule
#   semi-pd-fixedN    semi-PD, split held at N prefill SMs (e.g. semi-pd-fixed64)
#   unified           our engine, chunked prefill with piggybacked decodes on the whole GPU
#   unified-tokensN   unified with at most N tokens per iteration (`--max-prefill-tokens N`, e.g. unified-tokens1024:
#                     smaller iterations keep decode steps shorter, Sarathi-Serve's lever against TPOT)
#   disagg            DistServe-style baseline: prefill on one GPU and decode on another, KV moved between them
#   vllm              vLLM's OpenAI server with its defaults (needs .vllmA staged and .vllmB carried)
# GPUS (default 1): the GPUs each server gets, for a host with several (issue 7, docs/perf/disagg-recipe.md): GPUS
# semi-PD or unified engine actors behind the router, GPUS/2 disagg pairs (GPUS even), vLLM with
# --data-parallel-size GPUS.
# Needs `.device` (see bench/device_env.sh). Environment: SWEEPS ("workload:rate,rate ..."; "" none, and no warm-up), WINDOW (seconds of
# arrivals per rate), REPEAT (windows per rate, one after the other, each with its own prompts: the first one
# after another load shows how the server takes the change, the next ones its steady state), TTFT/TPOT (ms), REQUEST_TIMEOUT (s; a request still running then counts as failed),
# SHIFT_RATE (one shifting-workload run per config at this rate, SHIFT_WINDOW seconds of arrivals, phases
# SHIFT_PHASES as `bench serve --phases` takes them, e.g. "sharegpt:0.5@10,long-doc:0.5"),
# CONFIG_TIMEOUT (s per config: start-up plus sweeps), TOTAL_TIMEOUT (s for the whole script: no window starts
# that could not end before it; set it below the device call's limit), MODEL (default: the llama3-8b preset, random weights),
# PINS ("64 96": after a semi-pd config's own sweeps, pin its split to each of these with `semipd pin` and sweep
# again as semi-pd-pinnedN: fixed splits measured on the same server, without another start-up, on the same
# prompts and arrival times as every other server's window at that rate, the prefix cache reset before each
# window), PIN_SWEEPS (the sweeps of a pinned split, default SWEEPS; "" runs only the shifting run).
# Each server first gets an unrecorded warm-up of every sweep's workload (and, with SHIFT_RATE, every phase's): WARMUP_PROMPTS requests at WARMUP_RATE req/s
# (default 32 at 8; after 8 at 2, run 19's first measured windows on fresh semi-PD servers kept 15% of chat 45, where
# run 18's later window kept 98%, and 82% of chat 40 on 64 SMs, where a later window on the same split kept 93.5%;
# the cause is not measured).
# Results: CONFIG-WORKLOAD-RATE.json (naming its device, GPU count, commit and command; + .log, + .gpu.csv: SM clock
# MHz and power W every 250 ms, + .cpu.txt: each busy process's CPU every second), server logs and split decisions,
# in $OUT/compare.tgz (one file, rewritten after each window, so a run cut short still brings back what it
# measured), with the dynamic server's latency profile (semipd-profile.json); `semipd bench keep $OUT/compare.tgz
# docs/perf/DATE-DEVICE/RUN` writes what the repository keeps of them (no per-request records, each server's stall
# lines, no machine paths).
# A profile committed as bench/profiles/semipd-profile.json is loaded instead of
# profiling at start when its key (device, model, split set) matches, unless FRESH_PROFILE=1 (after a change
# to the engine's speed or to the profiler: commit the new one from the results; later calls load the
# committed one again, not one a previous call left in /tmp).
# Without a GPU (a CPU check of this script) it runs on what is installed; pass e.g. SERVE_EXTRA="--device cpu".
# BENCH_EXTRA: more options for every measured `bench serve`, e.g. "--structured-output json --no-whitespace".
set -uo pipefail
: "${SWEEPS=sharegpt:15,30,45 arxiv:3,6,9}" "${WINDOW:=10}" "${TTFT:=1000}" "${TPOT:=50}" "${REQUEST_TIMEOUT:=40}"
: "${SHIFT_RATE:=}" "${SHIFT_WINDOW:=30}" "${SHIFT_PHASES:=sharegpt:0.5,long-doc:0.5}" "${CONFIG_TIMEOUT:=300}"
: "${BENCH_EXTRA:=}" "${SERVE_EXTRA:=}" "${PINS:=}" "${PIN_SWEEPS=$SWEEPS}" "${REPEAT:=1}" "${WARMUP_RATE:=8}" "${WARMUP_PROMPTS:=32}"
: "${GPUS:=1}"
if [ "$GPUS" -lt 1 ]; then echo "GPUS must be >= 1, got $GPUS"; exit 2; fi
script_t0=$(date +%s)
gpu=$(command -v nvidia-smi)
if [ -n "$gpu" ]; then source bench/device_env.sh; else export PYTHONPATH="$PWD" TOKENIZERS_PARALLELISM=false; fi
device=$([ -n "$gpu" ] && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo cpu)  # in each result
model=${MODEL:-/tmp/models/llama3-8b}
[ -f $model/config.json ] || python3 -m cluster.cli make-model --preset llama3-8b --out $model --no-weights >/dev/null
res=/tmp/compare  # this call's results only: a lent machine's /tmp can keep an earlier session's
rm -rf $res && mkdir -p $res
if [ "${FRESH_PROFILE:-0}" = 1 ]; then rm -f /tmp/semipd-profile.json
elif [ -f bench/profiles/semipd-profile.json ]; then cp bench/profiles/semipd-profile.json /tmp/; fi

start_server() {  # config log -> sets $server
  local actors=$GPUS
  if [ "$1" = disagg ]; then  # a pair takes two GPUs (on the CPU check: one pair for GPUS=1)
    [ -z "$gpu" ] || [ $(( GPUS % 2 )) = 0 ] || { echo "disagg: GPUS=$GPUS is not even (a pair takes two GPUs)"; return 1; }
    actors=$(( GPUS > 1 ? GPUS / 2 : 1 ))
  fi
  local common=(--model $model --num-actors $actors --grpc-port 0 --http-port 8000 --served-model-name llama3-8b
                --ttft-slo-ms "$TTFT" --tpot-slo-ms "$TPOT" $SERVE_EXTRA)
  [ -n "$gpu" ] && common+=(--load-format dummy)
  local dynamic=(--policy model --profile-grid full --latency-profile /tmp/semipd-profile.json)
  case $1 in
    semi-pd-dynamic) flags=("${dynamic[@]}") ;;
    semi-pd-paced*) flags=("${dynamic[@]}" --decode-pace-ms "${1#semi-pd-paced}") ;;
    semi-pd-reactive) flags=(--policy reactive) ;;
    semi-pd-fixed*) flags=(--policy fixed --prefill-sms "${1#semi-pd-fixed}") ;;
    unified) flags=(--mode unified) ;;
    unified-tokens*) flags=(--mode unified --max-prefill-tokens "${1#unified-tokens}") ;;
    disagg) flags=(--mode disagg) ;;
    vllm)
      source .vllmB/setup-vllm.sh
      # pack-vllm.sh leaves out prometheus_fastapi_instrumentator, which `vllm serve` imports: put its wheel in
      # .vllmB/extra/ (`pip download --no-deps prometheus-fastapi-instrumentator -d .vllmB/extra`)
      for whl in .vllmB/extra/*.whl; do [ -f "$whl" ] && python3 -m zipfile -e "$whl" /tmp/vsite; done
      vllm-python -c "import prometheus_fastapi_instrumentator" 2>/dev/null \
        || { echo "vllm: prometheus_fastapi_instrumentator missing: its wheel goes in the carried .vllmB/extra/"; return 1; }
      vllm-python -m vllm.entrypoints.cli.main serve $model --load-format dummy --port 8000 --served-model-name llama3-8b \
        --dtype bfloat16 --max-model-len 8192 --gpu-memory-utilization 0.85 --data-parallel-size $GPUS > "$2" 2>&1 &
      server=$!; return ;;
    *) echo "unknown config $1"; return 1 ;;
  esac
  python3 -m cluster.cli --log-level INFO serve "${common[@]}" "${flags[@]}" > "$2" 2>&1 &
  server=$!
}

stop_server() {
  kill -TERM $server 2>/dev/null
  for _ in $(seq 60); do kill -0 $server 2>/dev/null || break; sleep 1; done
  kill -KILL $server 2>/dev/null
  wait $server 2>/dev/null
  pkill -KILL -x raylet; pkill -KILL -x gcs_server; pkill -KILL -f "ray::"
  return 0
}

time_left() {  # seconds before TOTAL_TIMEOUT
  echo $(( ${TOTAL_TIMEOUT:-1000000} - $(date +%s) + script_t0 ))
}

save_results() {
  [ -f /tmp/semipd-profile.json ] && cp /tmp/semipd-profile.json $res/
  tar -czf "$OUT/compare.tgz" -C $res .
}

prompt_seed() {  # workload rate pass: the same prompts for every server, new ones for each rate and pass
  echo $(( $(printf '%s' "$1-$2-$3" | cksum | cut -d' ' -f1) % 1000000 ))
}

reset_prefix_cache() {  # a semipd server forgets its cached pages, so that a window repeating an earlier one's
  # prompts (a pinned split after the dynamic one) computes them again; vLLM serves each window once
  curl -sf -X POST http://127.0.0.1:8000/reset_prefix_cache >/dev/null || echo "$1: prefix cache reset failed"
}

gpu_telemetry() {  # file: sample the GPU's SM clock and power every 250 ms into file, in the background
  # ($sampler), so that a window's figures can be read against the clocks it ran at (power capping)
  sampler=""
  [ -n "$gpu" ] || return 0
  python3 -m cluster.bench.telemetry sample "$1" 2>/dev/null &
  sampler=$!
}

cpu_sampler() {  # file: sample every process's CPU each second into file, in the background ($cpu_sampler): a
  # server process near a whole core delays the streams it carries
  python3 -m cluster.bench.process_cpu sample "$1" 2>/dev/null &
  cpu_sampler=$!
}

bench() {  # config workload rate window [pass]: pass 0 is CONFIG-WORKLOAD-RATE, pass i > 0 CONFIG-WORKLOAD-RATE-passI
  local n name="$1-$2-$3${5:+-pass$5}" phases=()
  if [ "$2" = shifting ]; then  # as many requests as the phases' rates bring in the window
    phases=(--phases "$SHIFT_PHASES")
    n=$(PYTHONPATH=$PWD python3 -c "
from cluster.bench.workloads import mean_rate_scale, parse_phases
print(max(16, round($3 * $4 * mean_rate_scale(parse_phases('$SHIFT_PHASES')))))")
  else
    n=$(python3 -c "print(max(16, round($3 * $4)))")
  fi
  [ "$1" != vllm ] && reset_prefix_cache "$1"
  gpu_telemetry "$res/$name.gpu.csv"
  cpu_sampler "$res/$name.cpu.txt"
  timeout $(( CONFIG_TIMEOUT / 2 )) python3 -m cluster.cli bench serve --base-url http://127.0.0.1:8000 --model llama3-8b \
    --tokenizer $model --workload "$2" "${phases[@]}" --request-rate "$3" --num-prompts "$n" --goodput ttft:$TTFT tpot:$TPOT \
    --seed "$(prompt_seed "$2" "$3" "${5:-0}")" \
    --label "$1" --request-timeout $REQUEST_TIMEOUT --result-dir $res --result-filename "$name.json" --disable-tqdm \
    --metadata "device=$device" "gpus=$GPUS" $BENCH_EXTRA > "$res/$name.log" 2>&1
  [ -n "$sampler" ] && kill $sampler 2>/dev/null
  kill $cpu_sampler 2>/dev/null
  python3 -m cluster.bench.process_cpu summary "$res/$name.cpu.txt" >> "$res/$name.log"
  python3 -m cluster.cli bench timeline "$res/$name.json" > "$res/$name.timeline.txt" 2>&1
  save_results
  echo "$name: $(grep -E "Request throughput|SLO attainment|P90 TTFT|P90 TPOT|Offered load|Prefix cache|Worker iterations|CUDA allocator|KV handoffs|Correct rate|CPU of the busiest" "$res/$name.log" | tr -s ' ' | paste -sd' ') $(python3 -m cluster.bench.telemetry summary "$res/$name.gpu.csv")"
}

warmup_workloads() {  # each sweep's workload, and with SHIFT_RATE each phase's, once
  local phases=""
  [ -n "$SHIFT_RATE" ] && phases=${SHIFT_PHASES//,/ }
  for item in $SWEEPS $phases; do echo "${item%%:*}"; done | awk '!seen[$0]++'
}

warm_up() {  # config: WARMUP_PROMPTS requests of each warm-up workload at WARMUP_RATE req/s, not recorded, so that no
  # measured window pays a server's first-use costs (vLLM's arxiv figures right after start-up were not monotone in the rate)
  for workload in $(warmup_workloads); do
    timeout 60 python3 -m cluster.cli bench serve --base-url http://127.0.0.1:8000 --model llama3-8b --tokenizer $model \
      --workload "$workload" --request-rate "$WARMUP_RATE" --num-prompts "$WARMUP_PROMPTS" --request-timeout 30 --disable-tqdm \
      --seed "$(prompt_seed "$workload" 2 warm-up)" \
      > "$res/$1-warmup-$workload.log" 2>&1 || echo "$1: warm-up on $workload failed (see its log)"
  done
}

sweeps() {  # label t0 [sweeps]: every rate of the sweeps (default SWEEPS) while CONFIG_TIMEOUT s since t0
  # and TOTAL_TIMEOUT allow, then the shifting run
  for sweep in ${3-$SWEEPS}; do
    local workload=${sweep%%:*} rates=${sweep#*:}
    for rate in ${rates//,/ }; do
      for pass in $(seq 0 $(( REPEAT - 1 ))); do
        [ $(( $(date +%s) - $2 )) -lt $CONFIG_TIMEOUT ] && [ "$(time_left)" -gt $(( WINDOW + 25 )) ] \
          || { echo "$1: out of time, skipping $workload $rate"; continue; }
        bench "$1" "$workload" "$rate" "$WINDOW" "${pass#0}"
      done
    done
  done
  [ -n "$SHIFT_RATE" ] && [ "$(time_left)" -gt $(( SHIFT_WINDOW + 25 )) ] && bench "$1" shifting "$SHIFT_RATE" "$SHIFT_WINDOW"
  return 0
}

pin_split() {  # redis prefill_sms: pin every engine to exactly that split and wait (30 s at most) until it runs it
  # (--exact: a server without that split, e.g. semi-pd-fixedN, which has only its own, is not pinned)
  python3 -m cluster.cli pin --redis "$1" --prefill-sms "$2" --exact --wait 30 >/dev/null
}

run_config() {  # config
  local t0=$(date +%s) log="$res/$1-server.log" up=0 redis=""
  start_server "$1" "$log" || return 1
  for _ in $(seq $CONFIG_TIMEOUT); do
    curl -sf http://127.0.0.1:8000/v1/models >/dev/null 2>&1 && { up=1; break; }
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if [ $up = 0 ]; then echo "$1: server did not come up"; tail -20 "$log"; stop_server; return 1; fi
  echo "$1: up after $(( $(date +%s) - t0 )) s"
  warm_up "$1"
  sweeps "$1" "$t0"
  [ "$1" != vllm ] && redis=$(grep -o 'semipd status --redis [^ ]*' "$log" | awk '{print $4}')
  if [ "${1#semi-pd}" != "$1" ]; then
    for n in $PINS; do  # the same server, split pinned: a fixed split without another start-up
      [ "$(time_left)" -gt $(( WINDOW + 60 )) ] || { echo "out of time, not pinning $n"; continue; }
      if pin_split "$redis" "$n"; then sweeps "semi-pd-pinned$n" "$(date +%s)" "$PIN_SWEEPS"
      else echo "semi-pd-pinned$n: not measured (the pin was not set or not applied)"; fi
    done
    [ -n "$PINS" ] && python3 -m cluster.cli pin --redis "$redis" --clear >/dev/null
  fi
  [ -n "$redis" ] && python3 -m cluster.cli status --redis "$redis" --decisions 100 > "$res/$1-decisions.txt" 2>&1
  stop_server
  echo "$1: done after $(( $(date +%s) - t0 )) s"
}

for config in "$@"; do
  run_config "$config"
  save_results
done
