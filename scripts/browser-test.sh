#!/usr/bin/env bash
# Drives the demo page of the projects service in Chromium (examples/browser):
#
#   scripts/browser-test.sh [PROJECTS_BIN]
#
# The binary is the argument, else $PROJECTS_BIN, else `cargo build -p
# kes-examples --bin projects` builds it. It runs on a free loopback port in
# a temporary directory (SQLite, the default store) and is stopped at the end.
# Installs what is missing: Debian's chromium (apt-get, as root) when
# $CHROMIUM (default /usr/bin/chromium) is absent, and the Node packages
# (npm ci, from examples/browser/package-lock.json). Needs node 20 or later.
#
# On failure, screenshots of the pages and the server log go to
# $KES_SCREENSHOTS (default /tmp/kes-browser-failure-<time>), printed.
# KES_DEMO_SCREENSHOT=FILE keeps a screenshot of the page with data;
# KES_REQUIRE_FEEDS=1 fails, instead of skipping the live check, when the
# Server-Sent Events feeds do not answer.
set -euo pipefail
cd "$(dirname "$0")/.."

chromium=${CHROMIUM:-/usr/bin/chromium}
if [[ ! -x "$chromium" ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "browser-test.sh: $chromium is missing; run apt-get install chromium as root, or set CHROMIUM" >&2
    exit 1
  fi
  echo "installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
export CHROMIUM=$chromium

if ! command -v node >/dev/null || (( $(node -p 'process.versions.node.split(".")[0]') < 20 )); then
  echo "browser-test.sh: node 20 or later is needed" >&2
  exit 1
fi
(
  cd examples/browser
  pinned=$(node -p 'require("./package.json").dependencies["playwright-core"]')
  installed=$(node -p 'try { require("./node_modules/playwright-core/package.json").version } catch { "" }')
  if [[ "$pinned" != "$installed" ]]; then
    npm ci --no-audit --no-fund
  fi
)

bin=${1:-${PROJECTS_BIN:-}}
if [[ -z "$bin" ]]; then
  cargo build -p kes-examples --bin projects
  target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  bin=$target/debug/projects
fi
bin=$(realpath "$bin")
[[ -x "$bin" ]] || { echo "browser-test.sh: $bin is not an executable" >&2; exit 1; }

work=$(mktemp -d -t kes-browser-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
# The test plays several people (ann, bob), named by the page's name
# field: the service trusts the X-Principal header, as it would behind a
# gateway that authenticates (never the default).
(cd "$work" && exec "$bin" --listen "127.0.0.1:$port" --trust-principal-header x-principal >"$work/server.log" 2>&1) &
server=$!

stop_server() {
  kill -TERM "$server" 2>/dev/null || return 0
  # A graceful stop waits for open requests; the browser is gone by now.
  for _ in $(seq 1 100); do
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$server" 2>/dev/null; then
    echo "browser-test.sh: the server did not stop within 10 s of SIGTERM; killing it" >&2
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
}
cleanup() {
  stop_server
  rm -rf "$work"
}
trap cleanup EXIT

# Ready when /health answers (the store and the views are open).
for _ in $(seq 1 600); do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "browser-test.sh: the server stopped at start:" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  curl -fsS -o /dev/null "$base/health" 2>/dev/null && break
  sleep 0.1
done
curl -fsS -o /dev/null "$base/health" || { echo "browser-test.sh: $base/health never answered" >&2; exit 1; }
page=$(curl -fsS "$base/" 2>/dev/null || true)
if [[ "$page" != *'<title>KES projects</title>'* ]]; then
  echo "browser-test.sh: $bin serves no demo page at / (mount kes_examples::web::router())" >&2
  exit 1
fi
echo "projects service: $base ($bin, in $work)"

shots=${KES_SCREENSHOTS:-/tmp/kes-browser-failure-$(date +%Y%m%d-%H%M%S)}
status=0
KES_BASE_URL=$base KES_SCREENSHOTS=$shots node examples/browser/demo.test.mjs || status=$?
if (( status != 0 )); then
  mkdir -p "$shots"
  cp "$work/server.log" "$shots/server.log"
  echo "browser test failed: screenshots and the server log are in $shots" >&2
fi
exit "$status"
