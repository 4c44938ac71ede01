#!/usr/bin/env bash
# Delivery throughput and latency: Panel beside SMTP baselines measured in the same run, into the
# same Postfix smtp-sink on loopback (a non-durable sink: it accepts and forgets). Prints one
# table; every figure is the median of RUNS runs. Not part of the test suite.
#   bench/delivery.sh [MESSAGES] [RUNS]      defaults 10000 and 3
# Needs root, Postfix (smtp-source, smtp-sink, and a private instance as the durable peer), python3,
# and PostgreSQL on 127.0.0.1:5432 (as in CI).
N=${1:-10000}
RUNS=${2:-3}
CONCURRENCY=${CONCURRENCY:-16}
PG=${PANEL_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
source "$(dirname "$0")/common.sh"
start_sink
# The durable peer: a private Postfix that accepts on its plain port, queues with fsync, and
# relays everything to the same sink.
start_lab relay "$SINK"
LAB_PORT=$LAB_PLAIN

median() { python3 -c 'import sys, statistics; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.0f}")' "$@"; }
rate_of() { python3 -c "import sys; print(f'{$N/(float(sys.argv[2])-float(sys.argv[1])):.0f}')" "$1" "$2"; }

smtp_source() { # sessions
  local s e; s=$(date +%s.%N)
  /usr/sbin/smtp-source -s "$1" -m "$N" -l 1024 -f panel@example.org -t bulk@example.org "127.0.0.1:$SINK"
  e=$(date +%s.%N); rate_of "$s" "$e"
}

postfix_peer() { # smtp-source 8 sessions into Postfix, until its queue is empty again
  local s e; s=$(date +%s.%N)
  /usr/sbin/smtp-source -s 8 -m "$N" -l 1024 -f panel@example.org -t bulk@relay.test "127.0.0.1:$LAB_PORT"
  until postqueue -c "$LAB_CONF" -p | grep -q "Mail queue is empty"; do sleep 0.05; done
  e=$(date +%s.%N); rate_of "$s" "$e"
}

smtplib() {
  python3 - "$SINK" "$N" <<'PY'
import smtplib, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
body = "Subject: bench\r\n\r\n" + "x" * 1000
s = smtplib.SMTP("127.0.0.1", port)
t = time.time()
for _ in range(n):
    s.sendmail("panel@example.org", ["bulk@example.org"], body)
print(f"{n / (time.time() - t):.0f}")
s.quit()
PY
}

# Panel, end to end: SERVICES workers running, then N messages enqueued in bulk by 4 concurrent
# loaders (through the store, each enqueue its own durable commit) while the workers deliver;
# the figure is N / (first enqueue -> last relay acceptance).
panel_run() { # url services
  local url=$1 services=$2 dir=$WORK/run-$RANDOM pids=() drain
  mkdir -p "$dir"
  PANEL_DATA_DIR=$dir PANEL_DATABASE_URL=$url $PANEL smtp set --host 127.0.0.1 --port "$SINK" --security none \
    --from panel@example.org --fallback-recipient ops@example.org > /dev/null
  for i in $(seq "$services"); do
    PANEL_DATA_DIR=$dir PANEL_DATABASE_URL=$url $PANEL worker --concurrency "$CONCURRENCY" 2> "$dir/worker-$i.log" &
    pids+=($!)
  done
  sleep 1
  $LOAD drain "$url" "$N" "$(date +%s.%N)" > "$dir/rate" &
  drain=$!
  for _ in 1 2 3 4; do $LOAD enqueue "$url" $((N / 4)) > /dev/null & done
  wait $drain
  cat "$dir/rate"
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
}

fresh_pg() {
  local name=panel_bench_$RANDOM$RANDOM
  psql "$PG" -qc "CREATE DATABASE $name" > /dev/null
  echo "${PG%/*}/$name"
}

drop_pg() { psql "$PG" -qc "DROP DATABASE IF EXISTS ${1##*/} WITH (FORCE)" > /dev/null; }

declare -A R
for run in $(seq "$RUNS"); do
  R[src1]+=" $(smtp_source 1)"
  R[src8]+=" $(smtp_source 8)"
  R[py]+=" $(smtplib)"
  R[peer]+=" $(postfix_peer)"
  d=$WORK/sqlite-$run; mkdir -p "$d"
  R[sqlite]+=" $(panel_run "sqlite://$d/panel.db" 1)"
  url=$(fresh_pg); R[pg1]+=" $(panel_run "$url" 1)"; drop_pg "$url"
  url=$(fresh_pg); R[pg3]+=" $(panel_run "$url" 3)"; drop_pg "$url"
done

# Latency of one test message on an idle service (enqueue -> relay's 250), 100 runs.
d=$WORK/latency; mkdir -p "$d"
export PANEL_DATA_DIR=$d
$PANEL smtp set --host 127.0.0.1 --port "$SINK" --security none --from panel@example.org --fallback-recipient ops@example.org > /dev/null
$PANEL worker 2> "$d/worker.log" &
sleep 1
for i in $(seq 100); do $PANEL smtp test --wait 10 --json > "$d/test-$i.json"; sleep 0.05; done
read -r LMED LP99 < <(python3 - "$d" <<'PY'
import json, sys, glob
from datetime import datetime
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
ms = sorted((t(m["attempts"][0]["finished_at"]) - t(m["created_at"])).total_seconds() * 1000
            for m in (json.load(open(f)) for f in glob.glob(sys.argv[1] + "/test-*.json")))
print(f"{ms[len(ms) // 2]:.1f} {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.1f}")
PY
)
unset PANEL_DATA_DIR

SRC8=$(median ${R[src8]})
row() { printf '%-70s %9s msg/s %8s\n' "$1" "$2" "$(python3 -c "print(f'{$2/$SRC8:.2f}')")"; }
printf '\n%s messages of ~1 KB into smtp-sink on loopback; median of %s runs; ratio against smtp-source 8 sessions\n' "$N" "$RUNS"
printf '%-70s %15s %8s\n' "measure" "rate" "ratio"
row "baseline: smtp-source, 1 session (non-durable)" "$(median ${R[src1]})"
row "baseline: smtp-source, 8 sessions (non-durable)" "$SRC8"
row "baseline: python smtplib, one reused connection (non-durable)" "$(median ${R[py]})"
row "durable peer: Postfix accepting 8 sessions, queue (fsync), relay" "$(median ${R[peer]})"
row "panel end to end, SQLite (synchronous=FULL), 1 service x $CONCURRENCY conns" "$(median ${R[sqlite]})"
row "panel end to end, PostgreSQL (synchronous_commit=on), 1 service x $CONCURRENCY" "$(median ${R[pg1]})"
row "panel end to end, PostgreSQL (synchronous_commit=on), 3 services x $CONCURRENCY" "$(median ${R[pg3]})"
printf '%-70s %9s ms\n' "test message on an idle service, enqueue -> relay 250, median of 100" "$LMED"
printf '%-70s %9s ms\n' "test message on an idle service, enqueue -> relay 250, p99 of 100" "$LP99"
