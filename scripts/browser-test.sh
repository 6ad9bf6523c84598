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

script=browser-test.sh
source scripts/lib/projects-service.sh
bin=$(projects_bin "${1:-}")
work=$(mktemp -d -t kes-browser-XXXXXX)
cleanup() {
  # The browser is gone by now: nothing holds the graceful stop open.
  stop_projects
  rm -rf "$work"
}
trap cleanup EXIT
# The test plays several people (ann, bob), named by the page's name
# field: the service trusts the X-Principal header, as it would behind a
# gateway that authenticates (never the default).
start_projects "$bin" "$work" --trust-principal-header x-principal
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
