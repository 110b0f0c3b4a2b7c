#!/usr/bin/env bash
# The production profile on this host: `make up PROFILE=prod` / `make down PROFILE=prod`.
#
#   scripts/prod.sh up      start what is not running, wait until every part is healthy, print the login
#   scripts/prod.sh down    stop every process `up` started (pid files under $CTRAIN_HOME/prod/pids)
#   scripts/prod.sh env     print the profile's environment (eval "$(scripts/prod.sh env)"): the settings,
#                           Airflow's, MLflow's; the secrets are sourced from their file, never printed
#   scripts/prod.sh purge   down, then drop the profile's databases and its Feast keys in Redis
#
# Native processes, no container: an S3 endpoint (moto_server) on 127.0.0.1:$CTRAIN_PROD_S3_PORT; an
# `mlflow server --app-name basic-auth` on Postgres (its auth DB too) with artifacts proxied to
# s3://$CTRAIN_PROD_BUCKET/mlflow; the Airflow api-server, scheduler (LocalExecutor: it runs the tasks),
# dag-processor and triggerer on Postgres. Postgres and Redis are existing servers (CTRAIN_PROD_POSTGRES,
# CTRAIN_PROD_REDIS); databases are $CTRAIN_PROD_DB_PREFIX_{airflow,mlflow,mlflow_auth,feast}, created
# when missing. Only the train task runs in a container: the training image ($CTRAIN_TRAINING_IMAGE, from
# `make images`) on the engine at DOCKER_HOST, host network. Settings: plugins/ctrain/prodenv.py.
#
# Idempotent: `up` leaves running parts alone and starts the others; a failure prints the failing part's
# log tail, stops everything and exits 1 (CTRAIN_UP_TIMEOUT_S). Secrets (MLflow admin password, S3 keys,
# Airflow's JWT key) are generated once into $CTRAIN_HOME/prod/secrets.env (0600) and reach the processes
# by environment only: not argv, not this script's output, not the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$PWD/plugins:$PWD/training_image${PYTHONPATH:+:$PYTHONPATH}"
cmd=${1:-}
components=(s3 mlflow airflow-api-server airflow-scheduler airflow-dag-processor airflow-triggerer)

profile_env() {  # the environment and shell variables (prod_dir, urls, ports) of python -m ctrain.prodenv env
  local out
  out=$(.venv/bin/python -m ctrain.prodenv env) || exit 1
  if [ ! -f "$(.venv/bin/python -c 'from ctrain.prodenv import secrets_file; from ctrain.settings import get_settings; print(secrets_file(get_settings()))')" ]; then
    out=$(grep -v '^set -a; ' <<< "$out")  # no secrets yet (before the first `up`)
  fi
  eval "$out"
  logs="$prod_dir/logs"
  pids="$prod_dir/pids"
}

running() {  # name: its recorded process (or, once it has called setsid, its process group) is alive
  [ -f "$pids/$1.pid" ] || return 1
  local pid
  pid=$(cat "$pids/$1.pid")
  kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null
}

stop_all() {
  local name pid
  for name in "${components[@]}"; do
    [ -f "$pids/$name.pid" ] || continue
    pid=$(cat "$pids/$name.pid")
    # each part is a session (and process group) leader: signal the group
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pids/$name.pid"
    echo "stopped $name ($pid)"
  done
}

fail() {  # message, log
  echo "prod up failed: $1" >&2
  echo "--- last lines of $2 ---" >&2
  tail -n 40 "$2" >&2 || true
  stop_all >&2
  exit 1
}

start() {  # name, command...: in its own session, so stop_all stops the whole group
  local name=$1
  shift
  running "$name" && return 0
  setsid "$@" > "$logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$pids/$name.pid"
}

wait_for() {  # name, log, check command...: poll until the check passes or the part dies / time runs out
  local name=$1 log=$2
  shift 2
  local deadline=$((SECONDS + up_timeout_s))
  until "$@" > /dev/null 2>&1; do
    running "$name" || fail "$name exited" "$log"
    [ "$SECONDS" -lt "$deadline" ] || fail "$name not healthy after ${up_timeout_s}s (CTRAIN_UP_TIMEOUT_S)" "$log"
    sleep 1
  done
}

airflow_healthy() {
  curl -fsS --max-time 5 "$airflow_url/api/v2/monitor/health" | .venv/bin/python -c '
import json, sys
health = json.load(sys.stdin)
sys.exit(0 if all(health.get(c, {}).get("status") == "healthy"
                  for c in ("metadatabase", "scheduler", "dag_processor", "triggerer")) else 1)'
}

up() {
  profile_env
  mkdir -p "$logs" "$pids"
  .venv/bin/python -m ctrain.prodenv init >> "$logs/init.log" 2>&1 || fail "databases and secrets" "$logs/init.log"
  profile_env  # now with the secrets
  read -r ui_user ui_password < <(.venv/bin/python -m ctrain.prodenv login)

  start s3 moto_server -H 127.0.0.1 -p "$s3_port"
  wait_for s3 "$logs/s3.log" curl -fsS --max-time 5 "$s3_url/moto-api/"
  .venv/bin/python -m ctrain.prodenv bucket >> "$logs/init.log" 2>&1 || fail "bucket $bucket" "$logs/init.log"

  start mlflow mlflow server --app-name basic-auth --backend-store-uri "$mlflow_backend" \
    --artifacts-destination "s3://$bucket/mlflow" --serve-artifacts \
    --host "$ui_host" --port "$mlflow_port" --workers 1
  wait_for mlflow "$logs/mlflow.log" curl -fsS --max-time 5 "$mlflow_url/health"
  # The pipeline's service account (MLFLOW_TRACKING_USERNAME, not an admin) gets MANAGE on every pipeline's
  # registered model and experiment; everyone else signed in has READ (the auth config's default).
  .venv/bin/python -m ctrain.mlflow_auth setup >> "$logs/init.log" 2>&1 || fail "MLflow permissions" "$logs/init.log"

  airflow db migrate >> "$logs/airflow-migrate.log" 2>&1 || fail "airflow db migrate" "$logs/airflow-migrate.log"
  start airflow-api-server airflow api-server
  start airflow-scheduler airflow scheduler --skip-serve-logs
  start airflow-dag-processor airflow dag-processor
  start airflow-triggerer airflow triggerer --skip-serve-logs
  wait_for airflow-scheduler "$logs/airflow-api-server.log" airflow_healthy
  for name in "${components[@]}"; do running "$name" || fail "$name exited" "$logs/$name.log"; done

  if ! .venv/bin/python -c 'import docker, sys; sys.exit(0 if docker.from_env().images.list(sys.argv[1]) else 1)' \
      "$training_image" 2>/dev/null; then
    echo "WARNING: training image $training_image not found on the engine (DOCKER_HOST=${DOCKER_HOST:-unset});" \
      "the train task needs it: make images" >&2
  fi
  echo "Airflow: $airflow_url  (user $ui_user, password $ui_password; kept in $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE)"
  echo "MLflow : $mlflow_url  (basic auth: admin $MLFLOW_AUTH_ADMIN_USERNAME; the pipeline signs in as $MLFLOW_TRACKING_USERNAME;" \
    "passwords in $prod_dir/secrets.env)"
  echo "S3     : $s3_url  (bucket $bucket; keys in $prod_dir/secrets.env)"
  echo "Logs in $logs; shell environment: eval \"\$(scripts/prod.sh env)\"; stop with: make down PROFILE=prod"
}

case "$cmd" in
  up) up ;;
  down) profile_env; mkdir -p "$pids"; stop_all ;;
  env) .venv/bin/python -m ctrain.prodenv env ;;
  purge) profile_env; mkdir -p "$pids"; stop_all; .venv/bin/python -m ctrain.prodenv purge ;;
  *) echo "usage: scripts/prod.sh up|down|env|purge" >&2; exit 2 ;;
esac
