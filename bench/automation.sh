#!/usr/bin/env bash
# What a workflow costs over a plain message: POST /api/v1/events (store the event, match the
# workflow, evaluate its condition, render a text+HTML template and the recipient, queue the
# message and its run in one transaction) against POST /api/v1/messages (validate and queue),
# through one keep-alive connection (with an API token) to one Panel Service on SQLite (synchronous=FULL), with the
# worker delivering to smtp-sink meanwhile. Alternating rounds; medians; ratio to the baseline.
# Usage: bench/automation.sh [REQUESTS_PER_ROUND] [ROUNDS]
source "$(dirname "$0")/common.sh"
N=${1:-1000}
ROUNDS=${2:-3}
start_sink
export PANEL_DATA_DIR=$WORK/data
$PANEL smtp set --host 127.0.0.1 --port "$SINK" --security none \
  --from "Identity Panel <panel@example.org>" --fallback-recipient ops@example.org > /dev/null
printf 'Hello {{ object.givenName }},\nyour login is {{ object.login }}.\n' > "$WORK/t.txt"
printf '<p>Hello <b>{{ object.givenName }}</b></p>\n' > "$WORK/t.html"
$PANEL template set welcome --subject "Welcome {{ object.givenName }}" --text-file "$WORK/t.txt" --html-file "$WORK/t.html" > /dev/null
cat > "$WORK/wf.json" <<'JSON'
{"name": "welcome", "trigger": "user.created", "condition": "object.department == 'Finance'",
 "steps": [{"kind": "email", "template": "welcome", "to": ["{{ object.manager.mail }}"]}]}
JSON
$PANEL workflow create --file "$WORK/wf.json" > /dev/null
echo "bench-password-123" | $PANEL admin create bench --role admin --password-stdin > /dev/null
TOKEN=$($PANEL admin token bench --label bench 2> /dev/null)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$PANEL serve --listen "127.0.0.1:$PORT" 2> "$WORK/serve.log" &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && break; sleep 0.1; done
python3 - "$PORT" "$N" "$ROUNDS" "$TOKEN" <<'PY'
import http.client, json, statistics, sys, time
port, n, rounds, token = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port)
def post(path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    r = conn.getresponse(); r.read()
    assert r.status in (200, 202), (path, r.status)
def message(i):
    post("/api/v1/messages", {"to": [f"boss{i}@example.org"], "subject": f"Welcome Ann {i}",
                              "text": f"Hello Ann,\nyour login is ann{i}.\n", "html": "<p>Hello <b>Ann</b></p>"})
def event(i):
    post("/api/v1/events", {"type": "user.created", "object": {"givenName": "Ann", "login": f"ann{i}",
         "department": "Finance", "manager": {"mail": f"boss{i}@example.org"}}})
rates = {"message": [], "event": []}
for r in range(rounds):
    for name, fn in (("message", message), ("event", event)):
        t = time.perf_counter()
        for i in range(n):
            fn(r * n + i)
        rates[name].append(n / (time.perf_counter() - t))
base = statistics.median(rates["message"])
print(f"{'case':<58} {'median':>10} {'ratio':>6}")
print(f"{'POST /api/v1/messages (baseline: validate, queue)':<58} {base:>8.0f}/s {1.0:>6.2f}")
ev = statistics.median(rates["event"])
print(f"{'POST /api/v1/events (match, condition, render, queue + run)':<58} {ev:>8.0f}/s {ev / base:>6.2f}")
PY
