"""The algorithm core (models, engine, methods, testing, runner) never imports ray, optuna or mlflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rayprune"
CORE = ["models", "engine", "methods", "testing"]
CORE_FILES = ["runner.py", "registry.py", "__init__.py"]
FORBIDDEN = {"ray", "optuna", "mlflow"}


def core_files() -> list[Path]:
    files = [p for d in CORE for p in (PACKAGE / d).rglob("*.py")]
    return files + [PACKAGE / f for f in CORE_FILES]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_sources_do_not_import_orchestration_libraries():
    offenders = {str(p.relative_to(PACKAGE)): sorted(imported_roots(p) & FORBIDDEN) for p in core_files()}
    assert not {k: v for k, v in offenders.items() if v}
    assert len(core_files()) > 10  # the scan really covers the core


@pytest.fixture(scope="module")
def loaded_modules() -> list[str]:
    """One fresh interpreter's report, line by line, of the heavy modules loaded after importing
    (1) the core and every method, (2) the modules of the sweep's Ray tasks (teacher, baseline,
    fine-tune, latency), (3) the trainable (what a trial's worker imports)."""
    code = (
        "import sys\n"
        "def loaded(roots):\n"
        "    return ','.join(sorted(m for m in sys.modules if m in roots or m.split('.')[0] in roots))\n"
        "import rayprune.models, rayprune.engine.train, rayprune.engine.data, rayprune.runner, rayprune.cli\n"
        "import rayprune.testing.conformance\n"
        "from rayprune.methods import MODULES, get_method\n"
        "[get_method(m) for m in MODULES]\n"
        "print(loaded({'ray', 'optuna', 'mlflow'}))\n"
        "import rayprune.orchestration.baseline, rayprune.orchestration.cell_finetune\n"
        "import rayprune.orchestration.isolated_latency\n"
        "print(loaded({'ray.tune', 'ray.train', 'ray.data', 'optuna', 'mlflow', 'pandas'}))\n"
        "import rayprune.orchestration.trainable\n"
        "print(loaded({'optuna', 'mlflow'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.slow  # a fresh interpreter importing torch and Ray
def test_importing_the_core_and_every_method_loads_none_of_them(loaded_modules):
    assert len(loaded_modules) == 3 and loaded_modules[0] == ""


@pytest.mark.slow
def test_a_ray_task_worker_loads_neither_tune_nor_optuna_nor_mlflow(loaded_modules):
    """The teacher, baseline, fine-tune and latency tasks run in Ray workers that import their
    modules: those load torch and Ray's core, not Tune, Train, Optuna or MLflow (about a CPU
    second per worker); a trial (Tune's own worker) loads neither Optuna nor MLflow."""
    assert loaded_modules[1:] == ["", ""]
