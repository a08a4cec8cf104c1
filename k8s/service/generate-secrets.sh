#!/bin/sh
# Prints the three Secrets of secrets.template.yaml with fresh random values (48 hex characters each, URL-safe),
# the database URLs carrying the same passwords as caloforge-postgres. Run it once per namespace:
#   k8s/service/generate-secrets.sh | kubectl -n caloforge create -f -
# (`create`, not `apply`: it refuses to overwrite existing Secrets, whose passwords PostgreSQL already uses.)
# Nothing is written to disk. The bootstrap token for your first client:
#   kubectl -n caloforge get secret caloforge-service -o jsonpath='{.data.bootstrap-token}' | base64 -d
set -eu

random_hex() {
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

POSTGRES_PASSWORD=$(random_hex)
CALOFORGE_DB_PASSWORD=$(random_hex)
MLFLOW_DB_PASSWORD=$(random_hex)
BOOTSTRAP_TOKEN=$(random_hex)

cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: caloforge-postgres
type: Opaque
stringData:
  postgres-password: "$POSTGRES_PASSWORD"
  caloforge-password: "$CALOFORGE_DB_PASSWORD"
  mlflow-password: "$MLFLOW_DB_PASSWORD"
---
apiVersion: v1
kind: Secret
metadata:
  name: caloforge-service
type: Opaque
stringData:
  bootstrap-token: "$BOOTSTRAP_TOKEN"
  database-url: "postgresql://caloforge:$CALOFORGE_DB_PASSWORD@postgres:5432/caloforge"
---
apiVersion: v1
kind: Secret
metadata:
  name: caloforge-mlflow
type: Opaque
stringData:
  backend-store-uri: "postgresql://mlflow:$MLFLOW_DB_PASSWORD@postgres:5432/mlflow"
YAML
