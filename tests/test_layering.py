"""cvtasks is the pure-PyTorch layer: it must never import Ray or MLflow (ARCHITECTURE.md)."""

import ast
from pathlib import Path

FORBIDDEN = {"ray", "mlflow", "pipelines"}
CVTASKS = Path(__file__).resolve().parents[1] / "cvtasks"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_cvtasks_never_imports_ray_mlflow_or_pipelines():
    files = sorted(CVTASKS.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(p.relative_to(CVTASKS)): sorted(_imported_roots(p) & FORBIDDEN) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


PIPELINES = CVTASKS.parent / "pipelines"


def _task_words() -> set[str]:
    """Every name a task declares: task names, dataset names and aliases, demo step names."""
    from cvtasks.tasks import all_datasets, task_class, task_names

    words = set(task_names())
    for _, dataset in all_datasets():
        words |= {dataset.name, dataset.folder, *dataset.aliases}
    for name in task_names():
        words |= {step.name for step in task_class(name).demo_steps}
    return words


def _named_literals(path: Path, words: set[str]) -> list[str]:
    """String constants equal to one of ``words``, except subscript keys (``cfg["style"]`` reads the config section
    of that name; style transfer's config section and loss term share the task's name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    subscript_keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    return [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in words and id(node) not in subscript_keys]


def test_pipelines_name_no_task():
    """pipelines is generic: what differs per task is declared by the task (cvtasks.catalog), never looked up in a
    table keyed by task name or compared with one here."""
    words = _task_words()
    assert {"cifar10", "hotdog", "banana", "voc", "style", "voc2012", "hotdog-source"} <= words
    found = [hit for path in sorted(PIPELINES.glob("*.py")) for hit in _named_literals(path, words)]
    assert found == []
