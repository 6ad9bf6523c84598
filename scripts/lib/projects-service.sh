# Sourced by the scripts that drive a running projects service
# (browser-test.sh, api-fuzz.sh): finding the binary, starting it on a free
# loopback port, waiting until it answers, and stopping it gracefully.
# Callers set `script` (their name, for messages) and `set -euo pipefail`.

# The projects binary: $1, else $PROJECTS_BIN, else a debug build.
projects_bin() {
  local bin=${1:-${PROJECTS_BIN:-}}
  if [[ -z "$bin" ]]; then
    cargo build -p kes-examples --bin projects >&2
    local target
    target=$(cargo metadata --format-version 1 --no-deps |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    bin=$target/debug/projects
  fi
  bin=$(realpath "$bin")
  [[ -x "$bin" ]] || { echo "$script: $bin is not an executable" >&2; return 1; }
  echo "$bin"
}

# Starts BIN in directory WORK (SQLite under WORK/data) with the extra
# arguments, logging to WORK/server.log; sets `server` (its pid) and `base`
# (its URL) and returns once /health answers.
start_projects() {
  local bin=$1 work=$2
  shift 2
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  base=http://127.0.0.1:$port
  (cd "$work" && exec "$bin" --listen "127.0.0.1:$port" "$@" >"$work/server.log" 2>&1) &
  server=$!
  # Ready when /health answers (the store and the views are open).
  for _ in $(seq 1 600); do
    if ! kill -0 "$server" 2>/dev/null; then
      echo "$script: the server stopped at start:" >&2
      cat "$work/server.log" >&2
      return 1
    fi
    curl -fsS -o /dev/null "$base/health" 2>/dev/null && break
    sleep 0.1
  done
  curl -fsS -o /dev/null "$base/health" || { echo "$script: $base/health never answered" >&2; return 1; }
}

# Stops the server `start_projects` started: SIGTERM, then SIGKILL after 10 s.
stop_projects() {
  [[ -n "${server:-}" ]] || return 0
  kill -TERM "$server" 2>/dev/null || return 0
  # A graceful stop waits for open requests.
  for _ in $(seq 1 100); do
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$server" 2>/dev/null; then
    echo "$script: the server did not stop within 10 s of SIGTERM; killing it" >&2
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
}
