#!/usr/bin/env bash
# Stop what scripts/up.sh started (the whole process group of each).
set -uo pipefail
cd "$(dirname "$0")/.."
home="${CTRAIN_HOME:-$PWD/.ctrain}"
for name in airflow mlflow; do
  pidfile="$home/pids/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  pkill -TERM -P "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  echo "stopped $name ($pid)"
done
