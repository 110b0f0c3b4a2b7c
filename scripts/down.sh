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
  rm -f "$pidfile"
  echo "stopped $name ($pid)"
done
