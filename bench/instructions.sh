#!/usr/bin/env bash
# bench/instructions.sh - user-space instructions per request of cheapproxy and of
# the bare aiohttp proxy (uvloop), counted by valgrind's callgrind: repeatable to
# about 0.3 % on a machine whose timings move by 20-50 % between runs, so a change
# of one per cent shows.  Kernel work (the socket calls) is not counted: the ratios
# here are lower than the throughput ratios of bench/run.sh, which include it.
#
#   bench/instructions.sh                  # both configs (same-protocol, translated)
#   MODES=same N=300 bench/instructions.sh # one config, fewer requests per row
#   LAYERS="core tap guards billing full" bench/instructions.sh
#                                          # where the instructions go: the same-protocol
#                                          # config with the request path cut down to each
#                                          # layer (bench/layers.py), one gateway per layer
#
# Everything runs inside a private network namespace with only loopback (as the
# shared harness does): nginx from ../shared/bench on 127.0.0.1:18080 with its
# payloads, cheapproxy (bench/make_config.py, every feature on) and
# ../shared/bench/bare_proxy.py --uvloop, each under callgrind and pinned to core
# $GW_CPUS; the load (the shared streaming client, wrk) on core $LOAD_CPUS.  Per
# row: a warm-up, the counters zeroed, then N streamed requests (4 at a time) or
# wrk for $WRK_SECONDS s (4 connections), the counters dumped, and the count
# divided by the requests answered.  Background work of the gateway (timers,
# the charge queue's fold, checkpoints) during the row is included, as it is in
# any throughput figure.  Takes 3-6 minutes.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$(cd "$ROOT/../shared" && pwd)}
VENV=${VENV:-$ROOT/.venv}
PEERS=${PEERS:-${XDG_CACHE_HOME:-$HOME/.cache}/cheapproxy-bench}
BPY=${BPY:-$PEERS/bench-venv/bin/python}
MODES=${MODES:-"same translated"}
N=${N:-500}
WRK_SECONDS=${WRK_SECONDS:-8}
GW_CPUS=${GW_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}

if [ "${CP_IN_NETNS:-0}" != 1 ]; then
  for need in valgrind callgrind_control nginx wrk taskset curl unshare "$BPY" "$VENV/bin/cheapproxy"; do
    command -v "$need" >/dev/null || { echo "missing $need (make install; ../shared/bench/setup_peers.sh; apt valgrind)" >&2; exit 1; }
  done
  exec unshare --net --fork env CP_IN_NETNS=1 bash "$0" "$@"
fi
ip link set lo up 2>/dev/null || python3 -c 'import socket,fcntl,struct;s=socket.socket();fcntl.ioctl(s,0x8914,struct.pack("16sH22x",b"lo",0x1|0x40))'

WORK=$(mktemp -d /tmp/cheapproxy-instr.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -f "$WORK/ngx/nginx.pid" ] && kill "$(cat "$WORK/ngx/nginx.pid")" 2>/dev/null || true; }
trap cleanup EXIT

mkdir -p "$WORK/ngx/tmp"
python3 "$SHARED/bench/upstream/make_payloads.py" "$WORK/ngx/html" > /dev/null
chmod -R 755 "$WORK/ngx"
taskset -c "$LOAD_CPUS" nginx -p "$WORK/ngx/" -e "$WORK/ngx/error.log" -c "$SHARED/bench/upstream/nginx.conf"

under_callgrind() {  # name cmd... -> starts it pinned under callgrind, sets PID_<name>
  local name=$1; shift
  taskset -c "$GW_CPUS" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$name.%p" "$@" > "$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$name=$!"
}

wait_up() {  # port
  for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$1/health" && return 0; sleep 1; done
  echo "port $1 did not come up" >&2; exit 1
}

# instructions per request over one measured load; $1 name (its valgrind pid in PID_<name>),
# then "stream API URL PATH MODEL HEADER..." or "json URL PATH MODEL HEADERS"
count() {
  local name=$1 kind=$2; shift 2
  local pid; pid=$(eval echo "\$PID_$name")
  local n
  if [ "$kind" = stream ]; then
    local api=$1 url=$2 path=$3 model=$4; shift 4
    local hs=(); for h in "$@"; do hs+=(-H "$h"); done
    taskset -c "$LOAD_CPUS" "$BPY" "$SHARED/bench/stream_client.py" --api "$api" --url "$url" --path "$path" --model "$model" \
      -c 4 -n 100 --warmup 0 --max-seconds 600 "${hs[@]}" > /dev/null 2>&1
    callgrind_control -z "$pid" > /dev/null 2>&1
    local out; out=$(taskset -c "$LOAD_CPUS" "$BPY" "$SHARED/bench/stream_client.py" --api "$api" --url "$url" --path "$path" \
      --model "$model" -c 4 -n "$N" --warmup 0 --max-seconds 600 "${hs[@]}" 2>&1 | tail -1)
    echo "$out" | grep -q " $N ok, 0 err" || { echo "$name: not every request succeeded: $out" >&2; exit 1; }
    n=$N
  else
    local url=$1 path=$2 model=$3 headers=$4
    BENCH_PATH=$path BENCH_MODEL=$model BENCH_HEADERS=$headers BENCH_STREAM=0 BENCH_API=openai \
      taskset -c "$LOAD_CPUS" wrk -t1 -c4 -d2s -s "$SHARED/bench/lua/chat.lua" "$url" > /dev/null
    callgrind_control -z "$pid" > /dev/null 2>&1
    local out; out=$(BENCH_PATH=$path BENCH_MODEL=$model BENCH_HEADERS=$headers BENCH_STREAM=0 BENCH_API=openai \
      taskset -c "$LOAD_CPUS" wrk -t1 -c4 -d"${WRK_SECONDS}s" -s "$SHARED/bench/lua/chat.lua" "$url")
    if echo "$out" | grep -q "Non-2xx"; then echo "$name: non-2xx answers: $out" >&2; exit 1; fi
    n=$(echo "$out" | grep -o '"requests": *[0-9]*' | grep -o '[0-9]*$')
  fi
  local before; before=$(ls "$WORK"/cg."$name".* 2>/dev/null | wc -l || true)
  callgrind_control -d "$pid" > /dev/null 2>&1
  for _ in $(seq 50); do [ "$(ls "$WORK"/cg."$name".* | wc -l)" -gt "$before" ] && break; sleep 0.2; done
  local f; f=$(ls -t "$WORK"/cg."$name".*.* | head -1)
  python3 -c "import sys; print(round(int(sys.argv[1]) / int(sys.argv[2])))" "$(awk '/^totals:/ {print $2}' "$f")" "$n"
}

under_callgrind bare "$BPY" "$SHARED/bench/bare_proxy.py" --uvloop --port 14150 --upstream http://127.0.0.1:18080
port=14250
if [ -n "${LAYERS:-}" ]; then
  for layer in $LAYERS; do
    mkdir "$WORK/$layer"
    "$VENV/bin/python" "$HERE/make_config.py" same > "$WORK/$layer/cheapproxy.toml"
    CP="$VENV/bin/cheapproxy --config $WORK/$layer/cheapproxy.toml"
    $CP users add bench --balance 1000000 --json > /dev/null
    $CP keys create bench --json | "$VENV/bin/python" -c 'import json,sys;print(json.load(sys.stdin)["key"])' > "$WORK/$layer/key"
    under_callgrind "cp_$layer" "$VENV/bin/python" "$HERE/layers.py" "$layer" --config "$WORK/$layer/cheapproxy.toml" serve --port "$port"
    eval "PORT_$layer=$port"
    port=$((port + 1))
  done
  wait_up 14150
  for layer in $LAYERS; do wait_up "$(eval echo "\$PORT_$layer")"; done
  B=http://127.0.0.1:14150
  echo "instructions per request by layer (callgrind, user space, bench/layers.py), $N streamed requests or ${WRK_SECONDS}s of wrk per row; $(date -u +%FT%TZ); $(git -C "$ROOT" rev-parse --short HEAD)"
  echo
  echo "| build | OpenAI non-stream | OpenAI stream | Anthropic stream |"
  echo "|---|--:|--:|--:|"
  python3 -c "import sys; print('| bare-uvloop proxy | ' + ' | '.join(f'{int(x):,}' for x in sys.argv[1:]) + ' |')" \
    "$(count bare json "$B" /v1/chat/completions gpt-bench "Authorization: Bearer x")" \
    "$(count bare stream openai "$B" /stream/v1/chat/completions gpt-bench-stream "Authorization: Bearer x")" \
    "$(count bare stream anthropic "$B" /stream/v1/messages claude-bench-stream "x-api-key: x" "anthropic-version: 2023-06-01")"
  for layer in $LAYERS; do
    U=http://127.0.0.1:$(eval echo "\$PORT_$layer")
    K=$(cat "$WORK/$layer/key")
    python3 -c "import sys; print(f'| {sys.argv[1]} | ' + ' | '.join(f'{int(x):,}' for x in sys.argv[2:]) + ' |')" "$layer" \
      "$(count "cp_$layer" json "$U" /v1/chat/completions gpt-bench "Authorization: Bearer $K")" \
      "$(count "cp_$layer" stream openai "$U" /v1/chat/completions gpt-bench-stream "Authorization: Bearer $K")" \
      "$(count "cp_$layer" stream anthropic "$U" /v1/messages claude-bench-stream "x-api-key: $K" "anthropic-version: 2023-06-01")"
  done
  exit 0
fi
for mode in $MODES; do
  mkdir "$WORK/$mode"  # a database of its own (bench.db beside the config)
  "$VENV/bin/python" "$HERE/make_config.py" "$mode" > "$WORK/$mode/cheapproxy.toml"
  CP="$VENV/bin/cheapproxy --config $WORK/$mode/cheapproxy.toml"
  $CP users add bench --balance 1000000 --json > /dev/null
  $CP keys create bench --json | "$VENV/bin/python" -c 'import json,sys;print(json.load(sys.stdin)["key"])' > "$WORK/$mode/key"
  under_callgrind "cp_$mode" "$VENV/bin/cheapproxy" --config "$WORK/$mode/cheapproxy.toml" serve --port "$port"
  eval "PORT_$mode=$port"
  port=$((port + 1))
done
wait_up 14150
for mode in $MODES; do wait_up "$(eval echo "\$PORT_$mode")"; done

B=http://127.0.0.1:14150
echo "instructions per request (callgrind, user space), $N streamed requests or ${WRK_SECONDS}s of wrk per row; $(date -u +%FT%TZ); $(git -C "$ROOT" rev-parse --short HEAD)"
echo
echo "| row | cheapproxy | bare-uvloop | bare/cp |"
echo "|---|--:|--:|--:|"
row() {  # label cp-count bare-count
  python3 -c "import sys; c, b = int(sys.argv[2]), int(sys.argv[3]); print(f'| {sys.argv[1]} | {c:,} | {b:,} | {b / c:.2f} |')" "$@"
}
bare_json=$(count bare json "$B" /v1/chat/completions gpt-bench "Authorization: Bearer x")
bare_oa=$(count bare stream openai "$B" /stream/v1/chat/completions gpt-bench-stream "Authorization: Bearer x")
bare_an=$(count bare stream anthropic "$B" /stream/v1/messages claude-bench-stream "x-api-key: x" "anthropic-version: 2023-06-01")
for mode in $MODES; do
  U=http://127.0.0.1:$(eval echo "\$PORT_$mode")
  K=$(cat "$WORK/$mode/key")
  name=cp_$mode
  label=$([ "$mode" = same ] && echo "" || echo "translated, ")
  row "${label}OpenAI client, non-stream" "$(count "$name" json "$U" /v1/chat/completions gpt-bench "Authorization: Bearer $K")" "$bare_json"
  row "${label}OpenAI client, stream" "$(count "$name" stream openai "$U" /v1/chat/completions gpt-bench-stream "Authorization: Bearer $K")" "$bare_oa"
  row "${label}Anthropic client, stream" "$(count "$name" stream anthropic "$U" /v1/messages claude-bench-stream "x-api-key: $K" "anthropic-version: 2023-06-01")" "$bare_an"
done
echo
echo "(bare-uvloop proxies each client's own protocol from nginx: in the translated rows it is the floor"
echo " for the client's protocol, as in bench/run.sh.)"
