# Shared by the bench/ scripts (sourced, not run): release builds, a scratch directory removed
# on exit together with every background process, and the relays the benchmarks talk to.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p panel --bin panel --example load
cargo build --release -q -p panel-testlab --example lab
PANEL=$PWD/target/release/panel
LOAD=$PWD/target/release/examples/load
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

# Postfix's smtp-sink on a free loopback port: accepts every message and forgets it. Sets SINK.
start_sink() {
  SINK=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  /usr/sbin/smtp-sink -u nobody "127.0.0.1:$SINK" 256 &
  sleep 0.5
}

# The private Postfix lab (arguments as for the lab example, e.g. `relay PORT`); its ports and
# paths are in $WORK/lab.out. Sets LAB_PLAIN, LAB_SUBMISSION, LAB_CA and LAB_CONF.
start_lab() {
  ./target/release/examples/lab "$@" > "$WORK/lab.out" 2>&1 &
  for _ in $(seq 200); do grep -q '^conf' "$WORK/lab.out" && break; sleep 0.1; done
  LAB_PLAIN=$(awk '/^plain/ {print $2}' "$WORK/lab.out")
  LAB_SUBMISSION=$(awk '/^plain/ {print $4}' "$WORK/lab.out")
  LAB_CA=$(awk '/^plain/ {print $8}' "$WORK/lab.out")
  LAB_CONF=$(awk '/^conf/ {print $2}' "$WORK/lab.out")
}

# 20 Test Messages, one every PAUSE seconds, each waited for; prints the median and the worst
# enqueue -> relay 250 in ms. The Test Messages' JSON goes to DIR.
test_latency() { # dir pause
  local i
  for i in $(seq 20); do $PANEL smtp test --wait 10 --json > "$1/test-$i.json"; sleep "$2"; done
  python3 - "$1" <<'PY'
import json, sys, glob, statistics
from datetime import datetime
def t(s): return datetime.fromisoformat(s.replace("Z", "+00:00"))
ms = []
for f in glob.glob(sys.argv[1] + "/test-*.json"):
    m = json.load(open(f))
    assert m["state"] == "delivered", m
    ms.append((t(m["attempts"][0]["finished_at"]) - t(m["created_at"])).total_seconds() * 1000)
print(f"{statistics.median(ms):.1f} {max(ms):.1f}")
PY
}
