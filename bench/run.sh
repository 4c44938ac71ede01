#!/usr/bin/env bash
# Benchmarks against the private Postfix lab (needs root and Postfix, as .ci/run installs).
# Prints one table. Not part of the test suite.
#   bench/run.sh [MESSAGES]        default 2000
N=${1:-2000}
source "$(dirname "$0")/common.sh"
start_lab
PLAIN=$LAB_PLAIN
export PANEL_DATA_DIR=$WORK/data
$PANEL smtp set --host 127.0.0.1 --port "$PLAIN" --security none --from panel@example.org --fallback-recipient ops@example.org > /dev/null

# 1. Test message latency on an idle service: enqueue -> relay's 250, 20 runs.
$PANEL worker 2> "$WORK/worker.log" &
WORKER=$!
sleep 1
test_latency "$WORK" 0.2 > "$WORK/latency.txt"
kill $WORKER; wait $WORKER 2>/dev/null || true

# 2. Worker throughput: N messages queued first, then one worker drains them.
for i in $(seq "$N"); do
  $PANEL send --to bulk@example.org --subject "bench $i" --text "$(head -c 700 /dev/zero | tr '\0' 'x')" --json > /dev/null
done
START=$(date +%s.%N)
$PANEL worker 2> "$WORK/worker2.log" &
WORKER=$!
while [ "$($PANEL messages list --status delivered --limit 100000 --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -lt $((N + 20)) ]; do sleep 0.2; done
END=$(date +%s.%N)
kill $WORKER; wait $WORKER 2>/dev/null || true
PANEL_RATE=$(python3 -c "print(f'{$N/($END-$START):.0f}')")

# Baseline in the same run: Postfix's smtp-source, one session, same relay port, 1 KB messages.
B_START=$(date +%s.%N)
/usr/sbin/smtp-source -s 1 -m "$N" -l 1024 -f panel@example.org -t bulk@example.org "127.0.0.1:$PLAIN"
B_END=$(date +%s.%N)
BASE_RATE=$(python3 -c "print(f'{$N/($B_END-$B_START):.0f}')")

read -r MED WORST < "$WORK/latency.txt"
printf '\n%-58s %12s\n' "measure" "value"
printf '%-58s %10s ms\n' "test message, enqueue -> relay 250, median of 20" "$MED"
printf '%-58s %10s ms\n' "test message, enqueue -> relay 250, worst of 20" "$WORST"
printf '%-58s %8s msg/s\n' "panel worker (SQLite, synchronous=FULL, 4 connections), $N msgs" "$PANEL_RATE"
printf '%-58s %8s msg/s\n' "baseline: smtp-source 1 session -> same Postfix port" "$BASE_RATE"
printf '%-58s %12s\n' "ratio panel / baseline" "$(python3 -c "print(f'{$PANEL_RATE/$BASE_RATE:.2f}')")"
