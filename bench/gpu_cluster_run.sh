#!/usr/bin/env bash
# On the GPU machine: the cluster (Ray actor, Redis controller, Serve OpenAI app) serving the
# llama3-8b preset, a shifting load from `semipd bench serve`, and the controller's split changes.
# Needs, on a warm machine: `.device` set up by an earlier call (flashinfer + compiled kernels), and
# `.devray` carried (pack.sh ray + redis built in another folder). Results and logs go to $OUT.
set -uo pipefail
source .device/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devray/wheels/*.whl
tar -xJf .devray/ray.tar.xz -C /tmp/site
for d in .devray/debs/*.deb; do dpkg -x "$d" /tmp/site/root; done
export PYTHONPATH="$PWD:/tmp/site" TOKENIZERS_PARALLELISM=false
model=/tmp/models/llama3-8b
[ -f $model/config.json ] || python3 -m cluster.cli make-model --preset llama3-8b --out $model --no-weights >/dev/null
python3 -m cluster.cli serve --model $model --load-format dummy --num-actors 1 --mode semi-pd \
  --ttft-slo-ms "${TTFT:-1000}" --tpot-slo-ms "${TPOT:-50}" --grpc-port 0 --http-port 8000 --served-model-name llama3-8b \
  > "$OUT/serve.log" 2>&1 &
serve=$!
for _ in $(seq 400); do grep -q "semipd status --redis" "$OUT/serve.log" && break; sleep 1; done
grep -q "semipd status --redis" "$OUT/serve.log" || { echo "server did not come up"; tail -40 "$OUT/serve.log"; exit 1; }
redis=$(grep -o 'semipd status --redis [^ ]*' "$OUT/serve.log" | awk '{print $4}')
python3 -m cluster.cli bench serve --base-url http://127.0.0.1:8000 --tokenizer $model --workload shifting --num-prompts "${N:-240}" \
  --request-rate "${RATE:-6}" --goodput ttft:${TTFT:-1000} tpot:${TPOT:-50} --label semi-pd-dynamic \
  --result-dir "$OUT" --result-filename serve-shifting.json --disable-tqdm 2>&1 | tee "$OUT/bench.log" | tail -40
python3 -m cluster.cli status --redis "$redis" --json > "$OUT/status.json" 2>&1
python3 -m cluster.cli status --redis "$redis" --decisions 20 2>&1 | tail -30
kill -TERM $serve; wait $serve
tail -5 "$OUT/serve.log"
