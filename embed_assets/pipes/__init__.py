"""Entry points that run outside the orchestrator through Dagster Pipes (a subprocess, a Kubernetes pod). Dagster-free:
they need `dagster-pipes` (a single-file package) and the core, not the dagster framework."""
