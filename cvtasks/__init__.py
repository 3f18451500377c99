"""raycv's pure-PyTorch layer: formats, transforms, box ops, models, losses, metrics, tasks.

Nothing in this package imports ray or mlflow; every function runs on a laptop in milliseconds.
"""
