"""Per-epoch MLflow metrics survive restarts exactly once, against a real (sqlite) MLflow store."""

from mlflow.tracking import MlflowClient

from pipelines import tracking


def _epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def test_replay_logs_only_missing_epochs_and_reports_all_the_run_has(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.create_run(client, "cifar10", {"task": "cifar10"})
    tracking.log_epoch(client, run_id, 0, {"val_acc": 0.3})
    tracking.log_epoch(client, run_id, 2, {"val_acc": 0.5})  # logged by an attempt whose checkpoint was lost

    history = [{"val_acc": 0.3, "epoch": 0}, {"val_acc": 0.4, "epoch": 1}]
    assert tracking.replay_history(client, run_id, history) == {0, 1, 2}
    assert _epochs(client, run_id) == [0, 1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "val_acc") if m.step == 1] == [0.4]


def test_best_model_registers_in_the_clients_store_whatever_the_default_store(tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch
    import torch

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    client = MlflowClient(uri)
    run_id = tracking.create_run(client, "cifar10", {"task": "cifar10"})
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(torch.nn.Linear(2, 1), name="model", serialization_format="pickle")
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"  # e.g. ./mlflow.db while --tracking-uri names another store
    mlflow.set_tracking_uri(elsewhere)
    try:
        version = tracking.register_best_model(client, "cifar10", run_id, "best")
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(None)
    assert str(client.get_model_version_by_alias("raycv-cifar10", "best").version) == version
    assert client.get_model_version("raycv-cifar10", version).run_id == run_id
