#!/usr/bin/env bash
# Queue depth: enqueue (in bulk, 500 per transaction) and claim (batches of 16) throughput, each
# the median of 3 runs, and the worker's peak resident memory while it delivers, with 1,000 and
# with 1,000,000 steps already queued (SQLite, synchronous=FULL). The deep queue is made by
# copying one enqueued message with SQL (needs the sqlite3 CLI). Not part of the test suite.
#   bench/scale.sh [DEPTH ...]      default: 1000 1000000
DEPTHS=${*:-1000 1000000}
source "$(dirname "$0")/common.sh"
start_sink

printf '\n%-12s %18s %18s %18s\n' "queued" "enqueue msg/s" "claim steps/s" "worker RSS MB"
for depth in $DEPTHS; do
  d=$WORK/depth-$depth; mkdir -p "$d"; db=$d/panel.db
  PANEL_DATA_DIR=$d $PANEL smtp set --host 127.0.0.1 --port "$SINK" --security none \
    --from panel@example.org --fallback-recipient ops@example.org > /dev/null
  $LOAD enqueue "sqlite://$db" 1 > /dev/null
  sqlite3 "$db" <<SQL
WITH RECURSIVE n(x) AS (SELECT 2 UNION ALL SELECT x + 1 FROM n WHERE x < $depth)
INSERT INTO messages (origin, state, content, from_addr, subject, message_id, used_fallback, created_at,
                      updated_at, next_attempt_at, window_start)
SELECT origin, state, content, from_addr, subject, message_id || x, used_fallback, created_at, updated_at,
       next_attempt_at, window_start FROM messages, n WHERE messages.id = 1;
INSERT INTO recipients (message_id, position, kind, address, state)
SELECT m.id, 0, r.kind, r.address, 'pending' FROM messages m, recipients r WHERE r.message_id = 1 AND m.id > 1;
SQL
  # Median of three runs each, on the same deep queue.
  enq=$(for _ in 1 2 3; do $LOAD enqueue "sqlite://$db" 2000; done | sort -n | sed -n 2p)
  claims=$(for _ in 1 2 3; do $LOAD claim "sqlite://$db" 5000; done | sort -n | sed -n 2p)
  # The worker delivering from the deep queue for 10 s: its peak resident memory.
  PANEL_DATA_DIR=$d $PANEL worker --concurrency 16 2> "$d/worker.log" &
  pid=$!; peak=0
  for _ in $(seq 50); do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status"); [ "$rss" -gt "$peak" ] && peak=$rss; sleep 0.2
  done
  kill $pid; wait $pid 2>/dev/null || true
  printf '%-12s %18s %18s %18s\n' "$depth" "$enq" "$claims" "$((peak / 1024))"
done
