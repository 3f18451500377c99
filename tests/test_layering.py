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
