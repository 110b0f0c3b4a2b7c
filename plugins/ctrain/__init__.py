"""ctrain: the Airflow-side library of the continuous-training pipeline.

Everything here is importable and testable without a running Airflow: DAG files in ``dags/`` are thin
wiring over these modules.
"""
