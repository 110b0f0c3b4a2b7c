#!/usr/bin/env bash
# Start Airflow (standalone) and the MLflow UI on the embedded defaults, in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # airflow standalone starts its components as `airflow ...`
eval "$(.venv/bin/python -m ctrain.localenv)"
mkdir -p "$CTRAIN_HOME/logs" "$CTRAIN_HOME/pids"
.venv/bin/airflow db migrate >> "$CTRAIN_HOME/logs/airflow-migrate.log" 2>&1
nohup .venv/bin/airflow standalone > "$CTRAIN_HOME/logs/airflow-standalone.log" 2>&1 &
echo $! > "$CTRAIN_HOME/pids/airflow.pid"
nohup .venv/bin/mlflow server --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --default-artifact-root "$CTRAIN_HOME/mlartifacts" --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" \
  > "$CTRAIN_HOME/logs/mlflow.log" 2>&1 &
echo $! > "$CTRAIN_HOME/pids/mlflow.pid"
for _ in $(seq 1 90); do
  if curl -fsS http://127.0.0.1:8080/api/v2/monitor/health >/dev/null 2>&1; then break; fi
  sleep 2
done
echo "Airflow: http://localhost:8080 (login: see $CTRAIN_HOME/airflow/simple_auth_manager_passwords.json.generated if asked)"
echo "MLflow : http://localhost:${MLFLOW_PORT:-5000}"
echo "Stop with: make down"
