# Shared by bench/api.sh and bench/pairs.sh (sourced, not run): one row of the API benchmark,
# messages sent as users send them, through the public HTTP API (8 keep-alive clients, each
# message answered only once durable), end to end to a sink. Needs N set by the caller.
PG=${PANEL_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cargo build --release -q -p panel --example apiload
APILOAD=$PWD/target/release/examples/apiload
start_sink

median() { python3 -c 'import sys, statistics; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.0f}")' "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until /metrics on PORT counts COUNT delivered messages; prints COUNT / (now - START).
drained() { # port count start
  python3 - "$@" <<'PY'
import re, sys, time, urllib.request
port, count, start = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
while True:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    m = re.search(r'^panel_messages\{state="delivered"\} (\d+)', text, re.M)
    if m and int(m.group(1)) >= count:
        print(f"{count / (time.time() - start):.0f}")
        break
    time.sleep(0.02)
PY
}

# A Panel Service (and SERVICES-1 workers) on URL, relaying to the sink; sets PORT and TOKEN.
start_panel() { # url services dir
  local url=$1 services=$2 dir=$3
  export PANEL_DATA_DIR=$dir PANEL_DATABASE_URL=$url
  $PANEL smtp set --host 127.0.0.1 --port "$SINK" --security none --from panel@example.org \
    --fallback-recipient ops@example.org > /dev/null
  printf 'bench-password-123' | $PANEL admin create bench --role admin --password-stdin > /dev/null
  TOKEN=$($PANEL admin token bench)
  PORT=$(free_port)
  # Their stdout is not the caller's: a figure is read from it. SERVE_UNDER: a command the
  # service runs under (bench/instructions.sh's callgrind).
  ${SERVE_UNDER:-} $PANEL serve --listen "127.0.0.1:$PORT" --concurrency 16 > /dev/null 2> "$dir/serve.log" &
  for i in $(seq 2 "$services"); do $PANEL worker --concurrency 16 > /dev/null 2> "$dir/worker-$i.log" & done
  until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/readyz')" 2>/dev/null; do sleep 0.1; done
  sleep 0.5
}

fresh_pg() {
  local name=panel_bench_$RANDOM$RANDOM
  psql "$PG" -qc "CREATE DATABASE $name" > /dev/null
  echo "${PG%/*}/$name"
}

# The event row's workflow: each user.created event mails one message rendered from a ~600-byte
# template (apiload's events carry a 700-byte note, so a request is ~1 KB like a message's).
event_workflow() { # dir
  printf 'Hello {{ object.login }}: %s\n' "$(head -c 600 /dev/zero | tr '\0' 'x')" > "$1/t.txt"
  $PANEL template set welcome --subject "Welcome {{ object.login }}" --text-file "$1/t.txt" > /dev/null
  echo '{"name": "welcome", "trigger": "user.created", "steps": [{"kind": "email", "template": "welcome", "to": ["{{ object.mail }}"]}]}' > "$1/wf.json"
  $PANEL workflow create --file "$1/wf.json" > /dev/null
}

# Busy CPU time of the whole machine so far (user, nice, system, irq, softirq), in ms.
busy_ms() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%d\n", ($2 + $3 + $4 + $7 + $8) * 1000 / hz }' /proc/stat; }

# One row: N messages of KIND (single, limited, bulk, event) through the API to a fresh database
# (sqlite, or pg: one made on $PG) served by SERVICES services; prints msg/s end to end, and with
# PANEL_API_CPU=1 also the whole machine's CPU ms per 1,000 messages over the same span (load,
# sink and database included).
panel_api() { # kind sqlite|pg services
  local kind=$1 url=$2 services=$3 dir=$WORK/run-$RANDOM$RANDOM s c rate
  mkdir -p "$dir"
  if [ "$url" = sqlite ]; then url="sqlite://$dir/panel.db"; else url=$(fresh_pg); fi
  start_panel "$url" "$services" "$dir"
  if [ "$kind" = limited ]; then
    # Sending limits on but never reached: what taking each send from the shared budget costs.
    $PANEL smtp set --messages-per-minute 100000 --recipients-per-day 10000000 > /dev/null
  fi
  [ "$kind" = event ] && event_workflow "$dir"
  # Each row starts with nothing of an earlier row's left to write back to the disk.
  sync
  c=$(busy_ms)
  s=$(date +%s.%N)
  $APILOAD "$PORT" "$TOKEN" "$N" 8 "${kind/limited/single}" > "$dir/latency"
  rate=$(drained "$PORT" "$N" "$s")
  if [ "${PANEL_API_CPU:-}" = 1 ]; then
    echo "$rate $(( ($(busy_ms) - c) * 1000 / N ))"
  else
    echo "$rate"
  fi
  pkill -f "listen 127.0.0.1:$PORT" || true
  [ "$services" -gt 1 ] && pkill -f "$PANEL worker" || true
  wait 2>/dev/null || true
  # A database made for this run goes with it: its files before the kernel writes them back
  # during a later row's run.
  if [ "${url#postgres}" != "$url" ]; then psql "$PG" -qc "DROP DATABASE IF EXISTS ${url##*/} WITH (FORCE)"; fi
  rm -rf "$dir"
}
