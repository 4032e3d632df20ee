#!/usr/bin/env bash
# bench/run.sh - measure cheapproxy beside the bare aiohttp proxy (and the peers,
# when installed) with the shared harness (../shared/bench: nginx upstream, wrk,
# the streaming client), in a private loopback-only network namespace.
#
#   bench/run.sh                 # same-protocol run, then translated run
#   MODES=same bench/run.sh      # only one of: same translated
#   PEERS_TOO=1 bench/run.sh     # also LiteLLM and Portkey (installed by setup_peers.sh)
#   DURATION=5 CONNS=16 STREAM_CONC=16 bench/run.sh   # a quick look
#   WORKERS=2 GW_CPUS=0,1 LOAD_CPUS=0,1 bench/run.sh   # serve --workers 2 (see docs/benchmarks.md)
#   ROUNDS=5 bench/run.sh        # the whole run 5 times over, then the medians (bench/summary.py)
#
# Results go under OUT_BASE (a new /tmp/cheapproxy-bench-results.* unless set):
# OUT_BASE/round-N/results-MODE/{results.jsonl,report.md}.  At the end the
# summary prints, per row, each target's median req/s over the rounds and the
# median of cheapproxy's per-round ratios (a ratio is only taken between
# targets measured in the same round, minutes apart, never across rounds).
#
# "same": OpenAI client -> OpenAI upstream and Anthropic client -> Anthropic upstream
# (passthrough).  "translated": Anthropic client -> OpenAI-Chat upstream and OpenAI
# client -> Anthropic upstream.  Every feature stays on: auth, routing, holds and
# settlement in SQLite, usage records, JSON logs.  After each run the script checks
# that every request the harness made was answered 200 and charged exactly once.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$(cd "$ROOT/../shared" && pwd)}
VENV=${VENV:-$ROOT/.venv}
MODES=${MODES:-"same translated"}
PORT=${PORT:-14200}
BASE_TARGETS="direct bare bare-uvloop custom"
[ "${PEERS_TOO:-0}" = 1 ] && BASE_TARGETS="$BASE_TARGETS portkey litellm-w1"
TARGETS=${TARGETS:-$BASE_TARGETS}

[ -x "$VENV/bin/cheapproxy" ] || { echo "no $VENV/bin/cheapproxy: run 'make install' first" >&2; exit 1; }
[ -x "$SHARED/bench/run_peers.sh" ] || { echo "shared harness not found at $SHARED/bench" >&2; exit 1; }
command -v nginx >/dev/null && command -v wrk >/dev/null || bash "$SHARED/bench/setup_peers.sh"

ROUNDS=${ROUNDS:-1}
OUT_BASE=${OUT_BASE:-$(mktemp -d /tmp/cheapproxy-bench-results.XXXXXX)}
for round in $(seq "$ROUNDS"); do
for mode in $MODES; do
  WORK=$(mktemp -d /tmp/cheapproxy-bench.XXXXXX)
  chmod 755 "$WORK"   # nginx workers (user nobody) read the payloads under it
  CFG=$WORK/cheapproxy.toml
  "$VENV/bin/python" "$HERE/make_config.py" "$mode" > "$CFG"
  CP="$VENV/bin/cheapproxy --config $CFG"
  $CP users add bench --balance 1000000 --json > /dev/null
  KEY=$($CP keys create bench --label bench --json | "$VENV/bin/python" -c 'import json,sys;print(json.load(sys.stdin)["key"])')
  OUT=$OUT_BASE/round-$round/results-$mode
  echo "== round $round of $ROUNDS, mode $mode (state in $WORK, results in $OUT)"
  OUT=$OUT \
  TARGETS="$TARGETS" \
  CUSTOM_CMD="$VENV/bin/cheapproxy --config $CFG serve --port $PORT --workers ${WORKERS:-1}" \
  CUSTOM_URL="http://127.0.0.1:$PORT" \
  CUSTOM_HEADERS="Authorization: Bearer $KEY" \
  CUSTOM_A_HEADERS="anthropic-version: 2023-06-01|x-api-key: $KEY" \
  CUSTOM_S_MODEL=gpt-bench-stream \
    bash "$SHARED/bench/run_peers.sh"
  "$VENV/bin/python" "$HERE/check_charges.py" "$CFG" "$OUT"
done
done
"$VENV/bin/python" "$HERE/summary.py" "$OUT_BASE"
