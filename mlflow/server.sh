#!/usr/bin/env bash
# Start an MLflow tracking server with the project's settings.
#
#   mlflow/server.sh                 # local: SQLite + ./mlartifacts on 127.0.0.1:5000
#   MLFLOW_HOST=0.0.0.0 MLFLOW_ALLOWED_HOSTS="mlflow,mlflow:*" mlflow/server.sh   # in a cluster
#
# Environment (defaults in brackets):
#   MLFLOW_BACKEND_STORE_URI   [sqlite:///mlflow.db]   runs, metrics, registry
#   MLFLOW_ARTIFACTS_DESTINATION [./mlartifacts]       served artifact store (s3://... in a cluster)
#   MLFLOW_HOST [127.0.0.1]  MLFLOW_PORT [5000]  MLFLOW_WORKERS [1]
#   MLFLOW_ALLOWED_HOSTS       Host headers accepted; list both `name` and `name:*` for a
#                              Kubernetes service (the server rejects others with 403)
#   MLFLOW_BIN [mlflow]        the mlflow executable
# Credentials (S3, database) come from the environment / Kubernetes Secrets, never from here.
set -euo pipefail

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-1}"
allowed="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*}"

# The server's background job runner (huey consumers) is for GenAI features the project
# does not use; it forks several processes that outlive a killed server.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_ENABLE_TELEMETRY="${MLFLOW_ENABLE_TELEMETRY:-false}"

exec "${MLFLOW_BIN:-mlflow}" server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" \
  --port "$port" \
  --workers "$workers" \
  --allowed-hosts "$allowed"
