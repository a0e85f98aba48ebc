"""What only the Makefile runs, outside the code any DVC stage depends on (`python -m tools.<name>`):
`dvc_setup` (make repro's first step), `mlflow_sync` (its last), `mlflow_server` (make
mlflow-server) and `mlflow_ui` (make ui)."""
