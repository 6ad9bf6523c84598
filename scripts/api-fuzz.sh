#!/usr/bin/env bash
# Generated requests from the projects service's own /openapi.json
# (schemathesis, from PyPI), against the service on SQLite:
#
#   scripts/api-fuzz.sh [PROJECTS_BIN]
#
# The binary is the argument, else $PROJECTS_BIN, else `cargo build -p
# kes-examples --bin projects` builds it. It runs on a free loopback port in
# a temporary directory and is stopped at the end. schemathesis is installed
# into a virtual environment ($KES_TOOLS, default /var/tmp/kes-tools) when
# missing, at the pinned version below.
#
# What fails the run:
# - any 5xx (not_a_server_error), an answer the document does not list or
#   does not describe (status code, content type, headers, body schema);
# - a schema-valid request answered 400 (positive_data_acceptance; the
#   domain's answers the document lists — 404, 409, 412, 422, 403 — are
#   answers, not failures) and a schema-violating request accepted
#   (negative_data_rejection);
# - an event in the log written by a request that was answered with an
#   error: every request has an id (x-request-id, echoed on the answer and
#   recorded with the events it appends), so the log is searched for the
#   ids of every refused request.
# The change feeds (`…/changes`, endless Server-Sent Events) are left out,
# and so are two checks that do not apply: ignored_auth (the service runs
# without authentication, as its default) and use_after_free (the audit
# history of a deleted aggregate stays readable, by design).
#
# KES_FUZZ_EXAMPLES (default 60) is the number of examples per operation;
# KES_FUZZ_SEED (default fixed) the seed. Reports go to $KES_FUZZ_REPORTS
# (default a temporary directory, printed).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
tools=${KES_TOOLS:-/var/tmp/kes-tools}
venv=$tools/schemathesis-$SCHEMATHESIS_VERSION
if [[ ! -x "$venv/bin/schemathesis" ]]; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

script=api-fuzz.sh
source scripts/lib/projects-service.sh
bin=$(projects_bin "${1:-}")
work=$(mktemp -d -t kes-fuzz-XXXXXX)
reports=${KES_FUZZ_REPORTS:-$work/reports}
mkdir -p "$reports"
trap stop_projects EXIT
start_projects "$bin" "$work"
echo "projects service: $base ($bin, in $work)"

cat >"$work/schemathesis.toml" <<'EOF'
[checks.positive_data_acceptance]
# The document's domain answers: not found, forbidden, conflict, stale
# version, refused by a business rule. A 400 is never one of them.
expected-statuses = ["2xx", "304", "403", "404", "409", "412", "422"]
EOF

status=0
(cd "$work" && "$venv/bin/schemathesis" --config-file "$work/schemathesis.toml" --no-color run "$base/openapi.json" \
  --exclude-path-regex '/changes$' \
  --checks all --exclude-checks ignored_auth,use_after_free \
  --max-examples "${KES_FUZZ_EXAMPLES:-60}" --seed "${KES_FUZZ_SEED:-20261203}" \
  --generation-database none \
  --report har --report-har-path "$reports/requests.har") || status=$?

# Every request answered with an error must have left nothing in the log.
python3 - "$reports/requests.har" "$work/data/events.db" <<'EOF' || status=$?
import json, sqlite3, sys
har, db = sys.argv[1], sys.argv[2]
entries = json.load(open(har))["log"]["entries"]
refused, sent = set(), 0
for e in entries:
    sent += 1
    status = e["response"]["status"]
    rid = next((h["value"] for h in e["response"]["headers"] if h["name"].lower() == "x-request-id"), None)
    if status >= 400 and rid:
        refused.add(rid)
conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
recorded = [json.loads(m).get("extra", {}).get("request_id") for (m,) in conn.execute("SELECT metadata FROM kes_events")]
leaked = sorted(refused.intersection(r for r in recorded if r))
print(f"generated requests sent: {sent}; answered with an error: {len(refused)}; events in the log: {len(recorded)}")
if leaked:
    print(f"events appended by refused requests: {leaked[:20]}", file=sys.stderr)
    sys.exit(1)
print("no refused request appended anything")
EOF

if [[ $status -ne 0 ]]; then
  echo "api-fuzz.sh: failed; reports in $reports, server log $work/server.log" >&2
  tail -20 "$work/server.log" >&2
  exit "$status"
fi
