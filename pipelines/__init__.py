"""raycv's Ray + MLflow layer: configs, Ray Data pipelines, Ray Train runs, Ray Tune sweeps, MLflow tracking, CLI.

Generic over tasks: everything task-specific lives in ``cvtasks.tasks``.
"""
