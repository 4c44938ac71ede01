#!/usr/bin/env bash
# Speed where users feel it: messages sent through the public HTTP API (each answered only once
# durable), end to end to the relay, beside a durable peer measured in the same invocation; and
# how long urgent mail waits behind queued bulk mail. Prints one table; every throughput is the
# median of RUNS interleaved rounds. Not part of the test suite.
#   bench/api.sh [MESSAGES] [RUNS]      defaults 3000 and 3
# Needs root, Postfix (smtp-source, smtp-sink and a private instance as the durable peer),
# python3, and PostgreSQL on 127.0.0.1:5432 (as in CI).
N=${1:-3000}
RUNS=${2:-3}
source "$(dirname "$0")/api-lib.sh"
# The durable peer: a private Postfix that queues each message with fsync and relays it to the sink.
start_lab relay "$SINK"

postfix_peer() { # smtp-source, 8 sessions, into Postfix, until its queue is empty again
  local s e; s=$(date +%s.%N)
  /usr/sbin/smtp-source -s 8 -m "$N" -l 1024 -f panel@example.org -t bulk@relay.test "127.0.0.1:$LAB_PLAIN"
  until postqueue -c "$LAB_CONF" -p | grep -q "Mail queue is empty"; do sleep 0.05; done
  e=$(date +%s.%N); python3 -c "print(f'{$N/($e-$s):.0f}')"
}

declare -A R
for run in $(seq "$RUNS"); do
  R[peer]+=" $(postfix_peer)"
  R[single]+=" $(panel_api single sqlite 1)"
  # A/B: BASELINE_PANEL=path/to/an/older/panel measures the same row with that build, interleaved.
  if [ -n "${BASELINE_PANEL:-}" ]; then
    R[base]+=" $(PANEL=$BASELINE_PANEL panel_api single sqlite 1)"
  fi
  R[limited]+=" $(panel_api limited sqlite 1)"
  R[bulk]+=" $(panel_api bulk sqlite 1)"
  # The services' threads (docs/configuration.md, Threads): one per core, where SQLite's
  # default is one less.
  R[single_cores]+=" $(PANEL_THREADS=$(nproc) panel_api single sqlite 1)"
  R[bulk_cores]+=" $(PANEL_THREADS=$(nproc) panel_api bulk sqlite 1)"
  R[event]+=" $(panel_api event sqlite 1)"
  R[pg]+=" $(panel_api single pg 3)"
done

# Urgent mail behind bulk mail: a relay that takes 500 messages a second (a recording sink
# answering after 32 ms, 16 connections), 10,000 bulk messages queued through the bulk API, then
# 20 Test Messages, one every 0.3 s while the bulk mail drains; each one's enqueue -> relay 250.
./target/release/examples/lab sink 32 > "$WORK/slow.out" 2>&1 &
for _ in $(seq 100); do grep -q '^sink' "$WORK/slow.out" && break; sleep 0.1; done
SINK=$(awk '/^sink/ {print $2}' "$WORK/slow.out")
dir=$WORK/priority; mkdir -p "$dir"
start_panel "sqlite://$dir/panel.db" 1 "$dir"
$APILOAD "$PORT" "$TOKEN" 10000 8 bulk > /dev/null
read -r URGENT_MED URGENT_WORST <<< "$(test_latency "$dir" 0.3)"
LEFT=$(python3 -c "import urllib.request,re; t=urllib.request.urlopen('http://127.0.0.1:$PORT/metrics').read().decode(); print(re.search(r'^panel_queue_depth (\d+)', t, re.M).group(1))")

PEER=$(median ${R[peer]})
ratio() { python3 -c "print(f'{$1/$PEER:.2f}x')"; }
printf '\n%-92s %8s %8s\n' "path (N = $N messages of ~1 KB, median of $RUNS interleaved rounds)" "msg/s" "ratio"
printf '%-92s %8s %8s   rounds:%s\n' "durable peer: smtp-source -s 8 -> private Postfix (fsync'd queue) -> smtp-sink" "$PEER" "1.00x" "${R[peer]}"
for k in ${BASELINE_PANEL:+base} single limited bulk event pg single_cores bulk_cores; do
  case $k in
    base) label="baseline build ($BASELINE_PANEL): 8 clients, POST /api/v1/messages -> SQLite" ;;
    single) label="Panel: 8 clients, POST /api/v1/messages (each 202 durable) -> panel serve (SQLite) -> smtp-sink" ;;
    limited) label="the same with sending limits on (never reached): each send takes from the shared budget" ;;
    bulk) label="Panel: 8 clients, POST /api/v1/messages/bulk, 100 per request" ;;
    event) label="Panel: 8 clients, POST /api/v1/events -> a matching workflow -> one message each" ;;
    pg) label="Panel: 8 clients, POST /api/v1/messages -> PostgreSQL, 1 serve + 2 workers" ;;
    single_cores) label="single messages as above, panel serve --threads $(nproc) (one per core; default one less)" ;;
    bulk_cores) label="bulk as above, panel serve --threads $(nproc)" ;;
  esac
  v=$(median ${R[$k]})
  printf '%-92s %8s %8s   rounds:%s\n' "$label" "$v" "$(ratio "$v")" "${R[$k]}"
done
# The machine's speed drifts between rounds: each round's rows against its own single row.
per_round() { # row [against, default single]
  python3 -c 'import sys, statistics
a, b = sys.argv[1].split(), sys.argv[2].split()
r = [100 * float(x) / float(y) for x, y in zip(a, b)]
print(f"median {statistics.median(r):.0f} %   rounds: " + " ".join(f"{x:.0f}" for x in r))' "${R[$1]}" "${R[${2:-single}]}"
}
printf '\nAgainst the single row of the same round: events %s\n' "$(per_round event)"
printf '%43s%s %s\n' '' 'PostgreSQL' "$(per_round pg)"
printf '%43s%s %s\n' '' 'single, one thread per core' "$(per_round single_cores)"
printf 'Against the bulk row of the same round: bulk, one thread per core %s\n' "$(per_round bulk_cores bulk)"
printf '\nUrgent mail behind bulk: 10,000 bulk messages queued for a relay taking 500 msg/s, then 20 Test Messages\n'
printf '  enqueue -> relay 250: median %s ms, worst of %s %s ms; bulk messages still queued after the 20: %s\n' \
  "$URGENT_MED" 20 "$URGENT_WORST" "$LEFT"
