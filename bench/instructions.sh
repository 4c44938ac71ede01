#!/usr/bin/env bash
# The work a serving service does per message, counted, not timed: `panel serve` (SQLite) runs
# under callgrind, which counts the instructions its threads execute (its database thread's
# included; the kernel's, the clients' and the relay's not), while MESSAGES messages of each
# ROW go through the public HTTP API as in bench/api.sh (8 keep-alive clients) to a sink. On this
# project's two busy cores timed rows spread by up to a third between rounds; a count spreads
# by ~2 % (group commits group the requests differently from run to run), so a change of a few
# percent in a service's own work shows here when bench/api.sh cannot tell it from noise. It is
# not a throughput: waiting, system calls and the other processes do not count. Not part of the
# test suite.
#   bench/instructions.sh [MESSAGES] [ROW ...]     defaults 1000, single event
# ROW: single, bulk or event. BASELINE_PANEL=path/to/panel counts the same rows for that build.
# RUNS (default 3): each row's count is the median of that many runs, builds in turn.
# Needs valgrind (Debian's package) besides what bench/api.sh needs; each run of 1,000 messages
# takes ~15 s.
set -euo pipefail
N=${1:-1000}
RUNS=${RUNS:-3}
ROWS=(single event)
[ $# -ge 2 ] && ROWS=("${@:2}")
[[ $N =~ ^[1-9][0-9]*$ && $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "MESSAGES and RUNS must be positive counts" >&2; exit 2; }
for row in "${ROWS[@]}"; do
  case $row in single | bulk | event) ;; *) echo "unknown row '$row' (single, bulk or event)" >&2; exit 2 ;; esac
done
command -v valgrind > /dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
if [ -n "${BASELINE_PANEL:-}" ] && [ ! -x "$BASELINE_PANEL" ]; then
  echo "BASELINE_PANEL=$BASELINE_PANEL is not an executable" >&2; exit 2
fi
source "$(dirname "$0")/api-lib.sh"

# Instructions per message of `$PANEL serve` for one row: 200 messages first, not counted
# (templates compiled, statements prepared, caches filled), then N counted from the first
# request until /metrics counts them all delivered.
count() { # row
  local dir=$WORK/cg-$RANDOM out
  mkdir -p "$dir"
  out=$dir/callgrind.out
  SERVE_UNDER="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$out" \
    start_panel "sqlite://$dir/panel.db" 1 "$dir"
  [ "$1" = event ] && event_workflow "$dir"
  local pid; pid=$(pgrep -f "valgrind.*listen 127.0.0.1:$PORT")
  $APILOAD "$PORT" "$TOKEN" 200 8 "$1" > /dev/null
  delivered "$PORT" 200
  callgrind_control -i on "$pid" > /dev/null 2>&1
  $APILOAD "$PORT" "$TOKEN" "$N" 8 "$1" > /dev/null
  delivered "$PORT" $((N + 200))
  callgrind_control -d "$pid" > /dev/null 2>&1
  kill "$pid"; wait "$pid" 2> /dev/null || true
  # The dump's totals line: every thread's instructions since counting began.
  awk -v n="$N" '/^(summary|totals):/ { print int($2 / n); exit }' "$out".*
  rm -rf "$dir"
}

# Waits until /metrics counts COUNT delivered messages. Asks twice a second: each answer is
# counted too, and would be many more of them at bench/api.sh's 50 a second.
delivered() { # port count
  until curl -s "http://127.0.0.1:$1/metrics" | awk -v c="$2" '/^panel_messages\{state="delivered"\}/ { ok = $2 >= c } END { exit !ok }'; do
    sleep 0.5
  done
}

# Each row RUNS times (builds in turn), a fresh database each time; the median, and the spread.
declare -A I
for run in $(seq "$RUNS"); do
  for row in "${ROWS[@]}"; do
    I[$row]+=" $(count "$row")"
    [ -z "${BASELINE_PANEL:-}" ] || I[base_$row]+=" $(PANEL=$BASELINE_PANEL count "$row")"
  done
done
# Median and spread (lowest-highest) in thousands of instructions; `median` is api-lib.sh's.
spread() { python3 -c 'import sys, statistics as s; v = [int(x) / 1000 for x in sys.argv[1:]]; print(f"{s.median(v):.0f} ({min(v):.0f}-{max(v):.0f})")' $1; }

printf '%s messages per row, %s runs; instructions per message of the serving service (SQLite),\n' "$N" "$RUNS"
printf 'thousands: median (lowest-highest)\n\n'
printf '| row | this build |%s against single |\n' "${BASELINE_PANEL:+ baseline | change |}"
printf '|---|---|%s---|\n' "${BASELINE_PANEL:+---|---|}"
for row in "${ROWS[@]}"; do
  this=$(median ${I[$row]})
  vs=""
  [ -z "${I[single]:-}" ] || vs=$(python3 -c "print(f'{$this / $(median ${I[single]}):.3f}x')")
  if [ -n "${BASELINE_PANEL:-}" ]; then
    change=$(python3 -c "print(f'{($this / $(median ${I[base_$row]}) - 1) * 100:+.1f} %')")
    printf '| %s | %s | %s | %s | %s |\n' "$row" "$(spread "${I[$row]}")" "$(spread "${I[base_$row]}")" "$change" "$vs"
  else
    printf '| %s | %s | %s |\n' "$row" "$(spread "${I[$row]}")" "$vs"
  fi
done
pkill -f "smtp-sink -u nobody 127.0.0.1:$SINK" || true
