#!/usr/bin/env bash
# A/B of one row of bench/api.sh, for changes smaller than its rounds spread (a build against
# itself differs by up to ~10 % in one invocation there): the build at BASELINE_PANEL and this
# tree's release build run the row in turn, PAIRS times, which goes first alternating, each run
# on a fresh database; each prints msg/s end to end and the whole machine's CPU per 1,000
# messages. Ends with the median change of both. Not part of the test suite.
#   BASELINE_PANEL=path/to/panel bench/pairs.sh [ROW] [MESSAGES] [PAIRS]
#   ROW: single, limited, bulk, event (SQLite, one service) or pg (PostgreSQL, 1 serve +
#   2 workers); defaults pg, 6000 and 6.
# Needs root, Postfix's smtp-sink, python3, and PostgreSQL on 127.0.0.1:5432 for pg.
ROW=${1:-pg}
N=${2:-6000}
PAIRS=${3:-6}
BASE=${BASELINE_PANEL:?set BASELINE_PANEL to the build to compare against}
case $ROW in
  single | limited | bulk | event) KIND=$ROW DB=sqlite SERVICES=1 ;;
  pg) KIND=single DB=pg SERVICES=3 ;;
  *) echo "unknown row $ROW: single, limited, bulk, event or pg" >&2; exit 2 ;;
esac
[ -x "$BASE" ] || { echo "BASELINE_PANEL $BASE is not an executable panel build" >&2; exit 2; }
BASE=$(realpath "$BASE")
source "$(dirname "$0")/api-lib.sh"
export PANEL_API_CPU=1

printf 'row %s, %s messages, %s pairs; msg/s and CPU ms per 1,000 messages (whole machine)\n' "$ROW" "$N" "$PAIRS"
RESULTS=()
for p in $(seq "$PAIRS"); do
  if [ $((p % 2)) = 1 ]; then
    read -r br bc <<< "$(PANEL=$BASE panel_api "$KIND" "$DB" "$SERVICES")"
    read -r nr nc <<< "$(panel_api "$KIND" "$DB" "$SERVICES")"
  else
    read -r nr nc <<< "$(panel_api "$KIND" "$DB" "$SERVICES")"
    read -r br bc <<< "$(PANEL=$BASE panel_api "$KIND" "$DB" "$SERVICES")"
  fi
  RESULTS+=("$br $bc $nr $nc")
  printf 'pair %d: baseline %6s msg/s %5s ms   this build %6s msg/s %5s ms\n' "$p" "$br" "$bc" "$nr" "$nc"
done
python3 - "${RESULTS[@]}" <<'PY'
import statistics, sys
pairs = [list(map(float, a.split())) for a in sys.argv[1:]]
rate = [100 * (n / b - 1) for b, _, n, _ in pairs]
cpu = [100 * (nc / bc - 1) for _, bc, _, nc in pairs]
def fmt(xs): return " ".join(f"{x:+.0f}" for x in xs)
print(f"this build against the baseline: msg/s median {statistics.median(rate):+.0f} % (pairs: {fmt(rate)}),")
print(f"  CPU per message median {statistics.median(cpu):+.0f} % (pairs: {fmt(cpu)})")
PY
