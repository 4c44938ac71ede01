#!/usr/bin/env bash
# Several configurations of bench/api.sh's rows side by side, for a question pairs.sh (one row,
# two builds) cannot ask: which of several builds, rows or thread counts is faster, and by how
# much against the first. Each round runs every configuration once, on a fresh database, starting
# one further along each round (the machine's speed drifts, and the first run of a round is not
# always the same one); prints each run, then per configuration the median msg/s and whole-machine
# CPU per 1,000 messages, and the median of its per-round ratio to the first configuration (more
# robust than the ratio of medians: single rounds of one row spread by up to a third here). Not
# part of the test suite.
#   ROUNDS=10 MESSAGES=4000 bench/grid.sh LABEL=BUILD:ROW[:THREADS] ...
#   BUILD: a panel binary ("this" for this tree's release build); ROW: single, limited, bulk,
#   event (SQLite, one service) or pg (PostgreSQL, 1 serve + 2 workers); THREADS: sets
#   PANEL_THREADS for that configuration's services.
#   e.g. bench/grid.sh base=/tmp/panel-old:event new=this:event one=this:event:1
# Needs root, Postfix's smtp-sink, python3, and PostgreSQL on 127.0.0.1:5432 for pg.
ROUNDS=${ROUNDS:-10}
N=${MESSAGES:-4000}
[ $# -ge 2 ] || { echo "usage: ROUNDS=10 MESSAGES=4000 bench/grid.sh LABEL=BUILD:ROW[:THREADS] ... (two or more)" >&2; exit 2; }
SPECS=("$@")
declare -A BUILD KIND DB SERVICES THREADS
LABELS=()
for spec in "${SPECS[@]}"; do
  label=${spec%%=*}
  IFS=: read -r build row threads <<< "${spec#*=}"
  { [ "$label" != "$spec" ] && [ -n "$label" ] && [ -z "${BUILD[$label]:-}" ]; } ||
    { echo "$spec: give each configuration its own LABEL=BUILD:ROW[:THREADS]" >&2; exit 2; }
  case $row in
    single | limited | bulk | event) KIND[$label]=$row DB[$label]=sqlite SERVICES[$label]=1 ;;
    pg) KIND[$label]=single DB[$label]=pg SERVICES[$label]=3 ;;
    *) echo "$spec: unknown row '$row': single, limited, bulk, event or pg" >&2; exit 2 ;;
  esac
  if [ -n "$threads" ] && ! { [[ $threads =~ ^[1-9][0-9]{0,3}$ ]] && [ "$threads" -le 1024 ]; }; then
    echo "$spec: THREADS '$threads' is not a count of threads (1-1024)" >&2; exit 2
  fi
  if [ "$build" != this ]; then
    [ -x "$build" ] || { echo "$spec: $build is not an executable panel build" >&2; exit 2; }
    build=$(realpath "$build")
  fi
  BUILD[$label]=$build THREADS[$label]=$threads
  LABELS+=("$label")
done
[[ $N =~ ^[1-9][0-9]*$ && $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS and MESSAGES must be positive counts" >&2; exit 2; }
source "$(dirname "$0")/api-lib.sh"
export PANEL_API_CPU=1

printf '%s rounds of %s messages; msg/s and CPU ms per 1,000 messages (whole machine)\n' "$ROUNDS" "$N"
OUT=$WORK/grid.txt
for r in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((${#LABELS[@]} - 1))); do
    label=${LABELS[$(((i + r - 1) % ${#LABELS[@]}))]}
    build=${BUILD[$label]}
    [ "$build" = this ] && build=$PANEL
    # Unset unless asked for: each service then takes its default.
    result=$(if [ -n "${THREADS[$label]}" ]; then export PANEL_THREADS=${THREADS[$label]}; else unset PANEL_THREADS; fi
      PANEL=$build panel_api "${KIND[$label]}" "${DB[$label]}" "${SERVICES[$label]}")
    echo "$r $label $result" >> "$OUT"
    printf 'round %d  %-12s %6s msg/s %5s ms\n' "$r" "$label" $result
  done
done
python3 - "$OUT" "${LABELS[@]}" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, label, rate, cpu = line.split()
    runs[label][r] = (float(rate), float(cpu))
first = sys.argv[2]
print(f"\n{'':12} {'msg/s':>7} {'CPU ms':>7}   per round against {first}: msg/s, CPU")
for label in sys.argv[2:]:
    mine = runs[label]
    rate = statistics.median(v[0] for v in mine.values())
    cpu = statistics.median(v[1] for v in mine.values())
    line = f"{label:12} {rate:7.0f} {cpu:7.0f}"
    if label != first:
        both = [r for r in mine if r in runs[first]]
        dr = statistics.median(100 * (mine[r][0] / runs[first][r][0] - 1) for r in both)
        dc = statistics.median(100 * (mine[r][1] / runs[first][r][1] - 1) for r in both)
        faster = sum(mine[r][0] > runs[first][r][0] for r in both)
        line += f"   {dr:+5.1f} %, {dc:+5.1f} %  (faster in {faster} of {len(both)} rounds)"
    print(line)
PY
