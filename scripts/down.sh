#!/usr/bin/env bash
# `make down`: stop what scripts/up.sh started, each component's whole process group, by its pid file.
set -uo pipefail
cd "$(dirname "$0")/.."
home="${CTRAIN_HOME:-$PWD/.ctrain}"
for pidfile in "$home"/pids/*.pid; do
  [ -f "$pidfile" ] || continue
  name=$(basename "$pidfile" .pid)
  pid=$(cat "$pidfile")
  # up.sh starts each component as a session (and process group) leader: signal the group.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  echo "stopped $name ($pid)"
done
