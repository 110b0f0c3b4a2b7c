#!/usr/bin/env bash
# `make up`: the embedded stack in the background. Airflow (api-server, scheduler, dag-processor,
# triggerer) and the MLflow UI listen on CTRAIN_UI_HOST (default 127.0.0.1: this machine only); the
# Airflow UI and API ask for a login (user admin, generated password, printed below).
# Waits until every component is healthy; if one exits or CTRAIN_UP_TIMEOUT_S (default 300) passes,
# prints the log's tail, stops what it started and exits 1. `make down` (scripts/down.sh) stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
eval "$(.venv/bin/python -m ctrain.localenv)"  # exports; ui_host, airflow_url, mlflow_port, mlflow_url, up_timeout_s
logs="$CTRAIN_HOME/logs"
pids="$CTRAIN_HOME/pids"
mkdir -p "$logs" "$pids"
components=(airflow-api-server airflow-scheduler airflow-dag-processor airflow-triggerer mlflow)

for name in "${components[@]}"; do
  if [ -f "$pids/$name.pid" ] && kill -0 "$(cat "$pids/$name.pid")" 2>/dev/null; then
    echo "$name is already running (pid $(cat "$pids/$name.pid")); run 'make down' first" >&2
    exit 1
  fi
done

fail() {  # message, log: say what failed with the log's tail, stop everything, exit 1
  echo "make up failed: $1" >&2
  echo "--- last lines of $2 ---" >&2
  tail -n 40 "$2" >&2 || true
  bash scripts/down.sh >&2 || true
  exit 1
}

# Created here, not by Airflow, so the password never lands in a component's log.
read -r ui_user ui_password < <(.venv/bin/python -m ctrain.localenv login)

.venv/bin/airflow db migrate >> "$logs/airflow-migrate.log" 2>&1 || fail "airflow db migrate" "$logs/airflow-migrate.log"

start() {  # name, command...: in its own session, so down.sh stops the whole process group
  local name=$1
  shift
  setsid "$@" > "$logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$pids/$name.pid"
}
# The api-server reads AIRFLOW__API__HOST/PORT. No log-server side processes (--skip-serve-logs):
# they would listen on every interface, and on one machine the API server reads the log files directly.
start airflow-api-server airflow api-server
start airflow-scheduler airflow scheduler --skip-serve-logs
start airflow-dag-processor airflow dag-processor
start airflow-triggerer airflow triggerer --skip-serve-logs
start mlflow mlflow server --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --default-artifact-root "$CTRAIN_HOME/mlartifacts" --host "$ui_host" --port "$mlflow_port" --workers 1

healthy() {  # every Airflow component reports healthy, and MLflow answers
  curl -fsS --max-time 5 "$airflow_url/api/v2/monitor/health" 2>/dev/null | .venv/bin/python -c '
import json, sys
health = json.load(sys.stdin)
sys.exit(0 if all(health.get(c, {}).get("status") == "healthy"
                  for c in ("metadatabase", "scheduler", "dag_processor", "triggerer")) else 1)' \
    && curl -fsS --max-time 5 "$mlflow_url/health" > /dev/null 2>&1
}

timeout_s="$up_timeout_s"  # CTRAIN_UP_TIMEOUT_S, a setting (default 300)
deadline=$((SECONDS + timeout_s))
until healthy; do
  for name in "${components[@]}"; do
    kill -0 "$(cat "$pids/$name.pid")" 2>/dev/null || fail "$name exited" "$logs/$name.log"
  done
  [ "$SECONDS" -lt "$deadline" ] || fail "not healthy after ${timeout_s}s (CTRAIN_UP_TIMEOUT_S)" "$logs/airflow-api-server.log"
  sleep 2
done

echo "Airflow: $airflow_url  (user $ui_user, password $ui_password; kept in $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE)"
echo "MLflow : $mlflow_url"
case "$ui_host" in
  127.0.0.1 | localhost | ::1)
    echo "Listening on $ui_host only. To open both UIs to the network on purpose: CTRAIN_UI_HOST=0.0.0.0 make up" ;;
  *)
    echo "WARNING: listening on $ui_host (CTRAIN_UI_HOST): reachable from the network. Airflow asks for the" \
      "login above; MLflow has no login, so anyone who reaches port $mlflow_port can read and change runs and models." ;;
esac
echo "Logs in $logs; stop with: make down"
