#!/usr/bin/env bash
# Installs, starts and stops the Kafka-compatible test broker (Tansu 0.6.0)
# used by kes-store-kafka's tests and CI.
#
#   scripts/kafka-broker.sh install          # cargo install tansu 0.6.0 unless present
#   scripts/kafka-broker.sh start PORT DIR   # SQLite engine in DIR, 127.0.0.1:PORT, background
#   scripts/kafka-broker.sh stop DIR         # clean stop through DIR/tansu.pid
#
# Then: KES_TEST_KAFKA_BROKERS=127.0.0.1:PORT cargo test -p kes-store-kafka
#
# Why these choices: the SQLite engine (not memory://) reports correct high
# watermarks; newer Tansu versions need a newer rustc; listener and
# advertised listener are both the loopback address so clients never get
# redirected to a name that does not resolve.
#
# Tansu 0.6.0's SQLite schema has no index on its `header` table, and its
# fetch looks up each returned record's headers with a query over that
# table: every record read costs a scan of every header the broker holds,
# so reads slow down with everything stored (measured: 20,000 records of
# one partition read in 20 s; 0.5 s with the index). `start` adds the
# index once the broker has made its schema. It changes how fast the test
# broker reads, not what it answers; KES and the raw baselines of kes-bench
# read from the same broker.
set -euo pipefail

TANSU_VERSION=0.6.0
START_TIMEOUT_S=${KES_BROKER_START_TIMEOUT:-30}
STOP_TIMEOUT_S=${KES_BROKER_STOP_TIMEOUT:-15}

die() { echo "kafka-broker.sh: $*" >&2; exit 1; }

tansu_bin() {
  if [[ -x "$HOME/.cargo/bin/tansu" ]] && "$HOME/.cargo/bin/tansu" --version >/dev/null 2>&1; then
    echo "$HOME/.cargo/bin/tansu"
  elif command -v tansu >/dev/null 2>&1 && tansu --help >/dev/null 2>&1; then
    command -v tansu
  else
    return 1
  fi
}

port_open() {
  # bash's /dev/tcp avoids depending on nc or ss.
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_install() {
  if bin=$(tansu_bin); then
    echo "tansu already installed: $bin ($("$bin" --version 2>/dev/null || echo unknown version))"
    return 0
  fi
  echo "installing tansu $TANSU_VERSION (takes a while: it compiles from source)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql,postgres
}

cmd_start() {
  local port=${1:-} dir=${2:-}
  [[ -n "$port" && -n "$dir" ]] || die "usage: $0 start PORT DIR"
  [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number: $port"
  local bin
  bin=$(tansu_bin) || die "tansu is not installed; run: $0 install"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local pidfile="$dir/tansu.pid" log="$dir/tansu.log"
  if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "a broker from $dir is already running (pid $(cat "$pidfile"))"
  fi
  if port_open "$port"; then
    die "port $port is already in use"
  fi
  # Tansu resolves the SQLite path against its working directory, so it runs
  # inside DIR with a relative database name.
  (
    cd "$dir"
    exec "$bin" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "sqlite://./tansu.db" \
      >>"$log" 2>&1 </dev/null
  ) &
  local pid=$!
  echo "$pid" >"$pidfile"
  local waited=0
  until port_open "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      echo "--- last lines of $log:" >&2; tail -n 20 "$log" >&2 || true
      die "tansu exited before accepting connections on 127.0.0.1:$port"
    fi
    if (( waited >= START_TIMEOUT_S * 10 )); then
      kill "$pid" 2>/dev/null || true
      rm -f "$pidfile"
      echo "--- last lines of $log:" >&2; tail -n 20 "$log" >&2 || true
      die "tansu did not accept connections on 127.0.0.1:$port within ${START_TIMEOUT_S}s"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  index_headers "$dir/tansu.db" "$pid"
  echo "tansu listening on 127.0.0.1:$port (pid $pid, data $dir/tansu.db, log $log)"
}

# Adds the missing index on Tansu's header table (see the top of this file),
# waiting for the broker to create the table.
index_headers() {
  local db=$1 pid=$2
  python3 - "$db" "$START_TIMEOUT_S" <<'PY' || { kill "$pid" 2>/dev/null || true; die "could not index the broker's header table in $db"; }
import sqlite3, sys, time
db, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
while True:
    try:
        c = sqlite3.connect(db, timeout=timeout)
        c.execute("CREATE INDEX IF NOT EXISTS kes_header_by_record ON header (topition, offset_id)")
        c.commit()
        c.close()
        break
    except sqlite3.OperationalError as e:
        if time.monotonic() > deadline:
            sys.exit(f"{db}: {e}")
        time.sleep(0.1)
PY
}

cmd_stop() {
  local dir=${1:-}
  [[ -n "$dir" ]] || die "usage: $0 stop DIR"
  local pidfile="$dir/tansu.pid"
  [[ -f "$pidfile" ]] || { echo "no broker pid file in $dir; nothing to stop"; return 0; }
  local pid
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$pidfile"
    echo "broker $pid was not running"
    return 0
  fi
  kill -TERM "$pid"
  local waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if (( waited >= STOP_TIMEOUT_S * 10 )); then
      echo "broker $pid ignored SIGTERM for ${STOP_TIMEOUT_S}s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$pidfile"
  echo "broker $pid stopped"
}

case "${1:-}" in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) die "usage: $0 install | start PORT DIR | stop DIR" ;;
esac
