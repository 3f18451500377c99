"""Per-epoch MLflow metrics survive restarts exactly once, against a real (sqlite) MLflow store."""

from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import load_config


def _epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def test_replay_logs_only_missing_epochs_and_reports_all_the_run_has(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.create_run(client, "cifar10", load_config("cifar10"))
    tracking.log_epoch(client, run_id, 0, {"val_acc": 0.3})
    tracking.log_epoch(client, run_id, 2, {"val_acc": 0.5})  # logged by an attempt whose checkpoint was lost

    history = [{"val_acc": 0.3, "epoch": 0}, {"val_acc": 0.4, "epoch": 1}]
    assert tracking.replay_history(client, run_id, history) == {0, 1, 2}
    assert _epochs(client, run_id) == [0, 1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "val_acc") if m.step == 1] == [0.4]


def test_best_model_registers_in_the_clients_store_whatever_the_default_store(tmp_path, monkeypatch):
    import mlflow
    import torch

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    client = MlflowClient(uri)
    run_id = tracking.create_run(client, "cifar10", load_config("cifar10"))
    tracking.log_model_state(client, run_id, torch.nn.Linear(2, 1).state_dict(), None)
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"  # e.g. ./mlflow.db while --tracking-uri names another store
    mlflow.set_tracking_uri(elsewhere)
    try:
        version = tracking.register_model(client, "cifar10", run_id, "best")
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(None)
    assert str(client.get_model_version_by_alias("raycv-cifar10", "best").version) == version
    assert client.get_model_version("raycv-cifar10", version).run_id == run_id


def test_sweep_moves_best_only_to_a_better_model(tmp_path):
    import torch

    from pipelines.tune import _register_if_better

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    runs = {}
    for name, accuracy in (("first", 0.6), ("worse", 0.5), ("better", 0.7)):
        runs[name] = tracking.create_run(client, "cifar10", load_config("cifar10"))
        client.log_metric(runs[name], "val_acc", accuracy)
        tracking.log_model_state(client, runs[name], torch.nn.Linear(2, 1).state_dict(), None)
    assert tracking.alias_metric(client, "cifar10", tracking.BEST_ALIAS, "val_acc") is None

    assert _register_if_better(client, "cifar10", runs["first"], "val_acc", 0.6, "max") == "1"
    assert _register_if_better(client, "cifar10", runs["worse"], "val_acc", 0.5, "max") is None
    assert client.get_model_version_by_alias("raycv-cifar10", "best").run_id == runs["first"]
    assert tracking.alias_metric(client, "cifar10", tracking.BEST_ALIAS, "val_acc") == 0.6
    assert _register_if_better(client, "cifar10", runs["better"], "val_acc", 0.7, "max") == "2"
    assert client.get_model_version_by_alias("raycv-cifar10", "best").run_id == runs["better"]
    # a lower-is-better metric: the lower value wins
    assert _register_if_better(client, "cifar10", runs["worse"], "val_acc", 0.5, "min") == "3"


def test_latest_names_the_newest_registered_version(tmp_path):
    import torch

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    for expected in ("1", "2"):
        run_id = tracking.create_run(client, "cifar10", load_config("cifar10"))
        tracking.log_model_state(client, run_id, torch.nn.Linear(2, 1).state_dict(), None)
        assert tracking.register_model(client, "cifar10", run_id, tracking.LATEST_ALIAS) == expected
        assert client.get_model_version_by_alias("raycv-cifar10", tracking.LATEST_ALIAS).run_id == run_id
        assert tracking.model_run_id(client, "models:/raycv-cifar10@latest") == run_id
