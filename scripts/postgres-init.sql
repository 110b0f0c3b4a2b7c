-- Databases for the production profile: Airflow's own (POSTGRES_DB), MLflow's and Feast's registry.
CREATE DATABASE mlflow;
CREATE DATABASE feast;
