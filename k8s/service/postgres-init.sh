# Sourced once by the postgres image's entrypoint on an empty data directory (docker-entrypoint-initdb.d):
# one role and one database for the adaptation service's job store and one for MLflow's backend store, each
# with its own password (Secret caloforge-postgres), so neither can read or alter the other's tables.
# psql variables (:'name') quote the passwords; they never appear on a command line.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v caloforge_password="$CALOFORGE_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE caloforge LOGIN PASSWORD :'caloforge_password';
CREATE DATABASE caloforge OWNER caloforge;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
