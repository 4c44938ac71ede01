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
