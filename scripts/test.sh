#!/usr/bin/env bash
# Runs the whole workspace's tests against real services:
#   - PostgreSQL at KES_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test),
#     started with pg_ctlcluster when it is installed but stopped;
#   - a Kafka-compatible broker (Tansu 0.6.0), installed when missing and
#     started on a free loopback port for this run only, stopped on exit;
#   - Chromium and Node packages for the demo page's browser test
#     (scripts/browser-test.sh), installed when missing;
#   - schemathesis (PyPI) for the requests generated from the OpenAPI
#     document (scripts/api-fuzz.sh), installed when missing.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p kes-core`).
#
# Tests that find a service missing fail when CI is set and are skipped
# otherwise (kes-test-support); the last lines of the output list every
# skipped test and why.
set -euo pipefail
cd "$(dirname "$0")/.."

export KES_TEST_DATABASE_URL=${KES_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "starting PostgreSQL"
  if ! pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start; then
    echo "test.sh: PostgreSQL did not start; tests that need it fail under CI and are skipped otherwise" >&2
    [[ -z "${CI:-}" ]] || exit 1
  fi
fi

skips=$(mktemp -t kes-skips-XXXXXX)
export KES_TEST_SKIPS=$skips
broker_dir=
cleanup() {
  if [[ -n "$broker_dir" ]]; then
    scripts/kafka-broker.sh stop "$broker_dir" || true
    rm -rf "$broker_dir"
  fi
  rm -f "$skips"
}
trap cleanup EXIT

if [[ -z "${KES_TEST_KAFKA_BROKERS:-}" ]]; then
  scripts/kafka-broker.sh install
  broker_dir=$(mktemp -d -t kes-broker-XXXXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  scripts/kafka-broker.sh start "$port" "$broker_dir"
  export KES_TEST_KAFKA_BROKERS="127.0.0.1:$port"
fi
echo "PostgreSQL: $KES_TEST_DATABASE_URL; Kafka: $KES_TEST_KAFKA_BROKERS"

status=0
# Every test binary runs even when one fails, so that one run shows every
# failure.
cargo test --workspace --all-features --no-fail-fast "$@" || status=$?

# The demo page in Chromium, against the projects binary the tests built
# (installs chromium and the Node packages when missing). Skipped when
# arguments narrowed the run to some crates.
if [[ $# -eq 0 ]]; then
  target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  KES_REQUIRE_FEEDS=1 scripts/browser-test.sh "$target/debug/projects" || status=$?
  # Thousands of requests generated from /openapi.json (schemathesis,
  # installed from PyPI when missing).
  scripts/api-fuzz.sh "$target/debug/projects" || status=$?
fi

echo
if [[ -s "$skips" ]]; then
  echo "skipped tests ($(wc -l <"$skips")), each with the service it missed:"
  sort "$skips" | sed 's/^/  /'
else
  echo "no test was skipped"
fi
exit "$status"
