#!/usr/bin/env bash
# The CPU each process spends on streaming, per 1,000 streamed tokens, at several `serve --stream-interval`s: one
# server per interval, the same load against each, every process's CPU sampled each second.
#   bash bench/stream_cost.sh [MODEL_DIR]        (default: a tiny-llama made in /tmp/models/tiny-llama)
# Environment: INTERVALS ("1 3"), RATE (req/s, 30), PROMPTS (300), OUTPUT_LEN (200), SERVE_EXTRA (e.g.
# "--device cpu" on a machine without a GPU), OUT (results folder, /tmp/stream-cost). Prints, per interval, the
# tokens per chunk the clients got and the five busiest processes' CPU seconds per 1,000 tokens. Serve's proxy
# and the ingress replica pay per chunk (serving's run 41 on the H100: each past a core at chat's chunk rates).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${INTERVALS:=1 3}" "${RATE:=30}" "${PROMPTS:=300}" "${OUTPUT_LEN:=200}" "${SERVE_EXTRA:=}" "${OUT:=/tmp/stream-cost}"
PY=${PY:-.venv/bin/python}
model=${1:-/tmp/models/tiny-llama}
[ -f "$model/config.json" ] || $PY -m cluster.cli make-model --preset tiny-llama --out "$model" >/dev/null
mkdir -p "$OUT"
port=8011
for n in $INTERVALS; do
  $PY -m cluster.cli serve --model "$model" --http-port $port --grpc-port 0 --served-model-name model \
      --stream-interval "$n" $SERVE_EXTRA > "$OUT/serve-$n.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break; sleep 1; done
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null \
    || { echo "stream_cost: the server did not come up (see $OUT/serve-$n.log)"; kill -INT "$server"; exit 1; }
  $PY -m cluster.bench.process_cpu sample "$OUT/cpu-$n.txt" &
  sampler=$!
  $PY -m cluster.cli bench serve --base-url "http://127.0.0.1:$port" --workload random --input-len 32 \
      --output-len "$OUTPUT_LEN" --range-ratio 0.2 --num-prompts "$PROMPTS" --request-rate "$RATE" \
      --max-concurrency 64 --save-result --result-dir "$OUT" --result-filename "interval-$n.json" \
      --label "stream-interval-$n" --disable-tqdm > "$OUT/bench-$n.log" 2>&1
  kill "$sampler"
  kill -INT "$server"
  wait "$server" || true
done
$PY - "$OUT" $INTERVALS <<'EOF'
import json, sys
from pathlib import Path

from cluster.bench.process_cpu import cpu_seconds

out = Path(sys.argv[1])
for n in sys.argv[2:]:
    records = [r for r in json.loads((out / f"interval-{n}.json").read_text())["requests"] if r["success"]]
    tokens, chunks = sum(r["output_tokens"] for r in records), sum(r["num_chunks"] for r in records)
    busiest = sorted(cpu_seconds((out / f"cpu-{n}.txt").read_text()).items(), key=lambda kv: -kv[1])[:5]
    print(f"--stream-interval {n}: {tokens} tokens in {chunks} chunks ({tokens / max(chunks, 1):.2f} a chunk); "
          "CPU s per 1,000 tokens: " + "; ".join(f"{name[:32]} {1000 * s / max(tokens, 1):.3f}" for name, s in busiest))
EOF
