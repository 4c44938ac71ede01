#!/usr/bin/env bash
# What a stored credential costs on a new relay connection: `panel smtp check` against the lab's
# STARTTLS+AUTH port with the password in a file (baseline) and in the credential store (license
# check, key file read, unwrap and decrypt), alternating, in one run. Not part of the test suite.
#   bench/credentials.sh [RUNS]      default 30
RUNS=${1:-30}
source "$(dirname "$0")/common.sh"
start_lab
SUBMISSION=$LAB_SUBMISSION
CA=$LAB_CA
PASSWORD=lab-password-not-secret

setup() { # $1: data dir, then the auth options
  local dir=$1; shift
  PANEL_DATA_DIR=$dir $PANEL smtp set --host 127.0.0.1 --port "$SUBMISSION" --security starttls --ca-file "$CA" \
    --tls-server-name localhost --from panel@example.org --fallback-recipient ops@example.org "$@" > /dev/null
}
printf '%s' "$PASSWORD" > "$WORK/pw"
setup "$WORK/file" --auth password --username panel --password-file "$WORK/pw"

mkdir -p "$WORK/stored"
$PANEL license keygen --out-dir "$WORK/authority" > /dev/null
printf '[license]\nauthorities = ["%s"]\n' "$(cat "$WORK/authority/authority.pub")" > "$WORK/stored/panel.toml"
export PANEL_DATA_DIR=$WORK/stored
$PANEL license add "$($PANEL license issue --authority-key "$WORK/authority/authority.key" --feature credential-storage --to Bench)" > /dev/null
printf '%s' "$PASSWORD" | $PANEL credential set lab --username panel --password-stdin > /dev/null
unset PANEL_DATA_DIR
setup "$WORK/stored" --auth password --credential lab

for i in $(seq "$RUNS"); do
  for mode in file stored; do
    s=$(date +%s%N)
    PANEL_DATA_DIR=$WORK/$mode $PANEL smtp check > /dev/null
    e=$(date +%s%N)
    echo "$mode $(( (e - s) / 1000 ))" >> "$WORK/times"
  done
done
python3 - "$WORK/times" <<'PY'
import sys, statistics
t = {}
for line in open(sys.argv[1]):
    mode, us = line.split()
    t.setdefault(mode, []).append(int(us) / 1000)
f, s = statistics.median(t["file"]), statistics.median(t["stored"])
print(f"\n{'panel smtp check (new connection, STARTTLS, AUTH PLAIN)':<58} {'median ms':>10}")
print(f"{'  password file (baseline)':<58} {f:>10.1f}")
print(f"{'  stored credential (license + decrypt)':<58} {s:>10.1f}")
print(f"{'  ratio stored / file':<58} {s / f:>10.2f}")
PY
