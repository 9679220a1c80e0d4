"""The sweep file schema: shipped files load, every kind of bad field gets its one-line message
before anything starts, paths are resolved; launch/sweep.py works alone; cluster.yaml validates."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from rayprune.orchestration.config import SweepConfigError, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def quickstart() -> dict:
    return yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_sweep_files_load(path):
    cfg = load_sweep(path)
    assert cfg.name == path.stem
    # uniform's budget is its FLOPs target alone: Optuna has nothing to choose, so its cells run once
    per_cell = sum(1 if m.name == "uniform" else cfg.optuna.samples_per_cell for m in cfg.methods)
    assert cfg.num_trials() == per_cell * len(cfg.grid.flops_targets) * len(cfg.grid.kd_weights)
    assert Path(cfg.storage_path).is_absolute() or "://" in cfg.storage_path


def test_the_required_files_are_shipped():
    assert {p.name for p in SPACES} >= {
        "quickstart.yaml",
        "cifar10_resnet56.yaml",
        "cifar100_resnet56.yaml",
        "imagenet_resnet50.yaml",
    }
    paper = load_sweep(ROOT / "search_spaces" / "cifar10_resnet56.yaml")
    assert paper.model == "cifar_resnet:56" and paper.grid.kd_weights == [0.0, 0.9]
    assert 0.47 in paper.grid.flops_targets and paper.resources.gpu > 0
    quick = load_sweep(ROOT / "search_spaces" / "quickstart.yaml")
    assert quick.dataset.name == "digits" and len(quick.grid.flops_targets) == len(quick.grid.kd_weights) == 2
    assert quick.resources.gpu == 0 and quick.tracking.uri.startswith("sqlite:///")


def _mutate(path: str, value):
    """A mutation setting a dotted path (list indices as ints) to ``value`` (None: delete it)."""

    def apply(raw: dict) -> None:
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = raw
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value

    return apply


BAD = [
    ("methods.0.name", "foo", "methods[0].name: unknown method 'foo'; known: ast, tas, sp, uniform, l1, fpgm, random"),
    ("methods.1.hparams", {"bogus": 1}, "methods[1].hparams.bogus: unknown field; allowed: pretrain_epochs, "),
    ("methods.1.hparams", {"pretrain_epochs": 0}, "methods[1].hparams.pretrain_epochs: Input should be greater than"),
    ("methods", [{"name": "l1"}, {"name": "l1"}], "methods: each method may appear once"),
    ("optuna.sampler", "cmaes", "optuna.sampler: Input should be 'tpe', 'random', 'gp' or 'nsga2'"),
    ("optuna.stage_prune", [[0.1, 0.5]], "optuna.stage_prune: the model has 3 stages, so give 3 [low, high] ranges"),
    ("optuna.stage_prune", [[0.1, 0.2]] * 3, "optuna.stage_prune: FLOPs target 0.500 is impossible"),
    (
        "optuna.stage_prune",
        [[0.5, 0.2]] * 3,
        "optuna.stage_prune: range 0 must satisfy 0 <= low <= high < 1, got [0.5, 0.2]",
    ),
    ("optuna.samples_per_cell", 0, "optuna.samples_per_cell: Input should be greater than or equal to 1"),
    ("grid.flops_targets", [0.5, 1.5], "grid.flops_targets: a FLOPs target must be in (0, 1], got 1.5"),
    ("grid.kd_weights", [0.9, 0.9], "grid.kd_weights: values must be unique"),
    ("teacher", None, "teacher: grid.kd_weights has a weight > 0, which needs a teacher"),
    ("teacher", {"checkpoint": "/nonexistent/teacher"}, "teacher.checkpoint: /nonexistent/teacher is not a saved"),
    ("teacher", {"checkpoint": "x", "recipe": {}}, "teacher: set exactly one of teacher.checkpoint"),
    (
        "recipes.search",
        {"epochz": 1},
        "recipes.search.epochz: unknown field; did you mean 'epochs'? allowed: epochs, batch_size,",
    ),
    ("recipes.finetune", {"schedule": "linear"}, "recipes.finetune.schedule: Input should be 'cosine', 'step'"),
    ("model", "cifar_resnet:57", "model: cifar_resnet: unknown variant '57'"),
    ("model", "alexnet:1", "model: unknown model family 'alexnet'"),
    ("modle", "x", "modle: unknown field; did you mean 'model'? allowed: name, dataset, model, spec,"),
    ("resources.gpu", -1, "resources.gpu: Input should be greater than or equal to 0"),
    ("resources.gpus", 1, "resources.gpus: unknown field; did you mean 'gpu'? allowed: cpu, gpu"),
    (
        "dataset.name",
        "mnist",
        "dataset.name: Input should be 'cifar10', 'cifar100', 'digits', 'imagefolder', 'imagenet' or",
    ),
    ("tracking", None, "tracking: required field is missing"),
    ("scheduler", {"type": "pbt"}, "scheduler.type: Input should be 'asha'"),
    ("spec", {"family": "cifar_resnet"}, "set exactly one of model (FAMILY:VARIANT"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{b[0]}={b[1]!r}"[:40] for b in BAD])
def test_bad_field_names_field_and_allowed_values(path, value, message):
    raw = copy.deepcopy(quickstart())
    _mutate(path, value)(raw)
    with pytest.raises(SweepConfigError) as err:
        parse_sweep(raw, "search_spaces/x.yaml")
    text = str(err.value)
    assert text.startswith(f"search_spaces/x.yaml: {message}"), text
    assert "\n" not in text


def test_file_level_errors(tmp_path):
    with pytest.raises(SweepConfigError, match=r"nope.yaml: no such sweep file"):
        load_sweep(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\nmethods: [\n")
    with pytest.raises(SweepConfigError, match=r"bad.yaml: not valid YAML at line 3"):
        load_sweep(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SweepConfigError, match=r"list.yaml: a sweep file must be a YAML mapping"):
        load_sweep(tmp_path / "list.yaml")


def test_paths_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = quickstart()
    raw["dataset"]["data_dir"] = "data"
    raw["storage_path"] = "results"
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_sweep(
        "sweep.yaml", {"tracking.uri": "sqlite:///sub/m.db", "tracking.experiment": "other", "storage_path": None}
    )
    assert cfg.dataset.data_dir == str(tmp_path / "data")
    assert cfg.storage_path == str(tmp_path / "results")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/sub/m.db" and cfg.tracking.experiment == "other"
    s3 = load_sweep("sweep.yaml", {"storage_path": "s3://bucket/x", "tracking.uri": "http://head:5000"})
    assert s3.storage_path == "s3://bucket/x" and s3.tracking.uri == "http://head:5000"


def test_cells_cover_the_grid_per_method():
    cfg = parse_sweep(quickstart())
    cells = cfg.cells()
    assert len(cells) == len(set(cells)) == 2 * 2 * 2
    assert {(c.flops_target, c.kd_weight) for c in cells if c.method == "l1"} == {
        (0.5, 0.0),
        (0.5, 0.9),
        (0.7, 0.0),
        (0.7, 0.9),
    }


def test_bad_file_stops_the_cli_before_anything_starts(tmp_path, monkeypatch, capsys):
    """One line on stderr, exit 2; no Ray, no MLflow database, no results directory."""
    import ray

    from rayprune.cli import sweep_main as main

    monkeypatch.chdir(tmp_path)
    raw = quickstart()
    raw["methods"][0]["name"] = "foo"
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--space", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "rayprune: error: x.yaml: methods[0].name: unknown method 'foo'; known: ast, tas, sp, uniform, "
        "l1, fpgm, random\n"
    )
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]


@pytest.mark.slow
def test_launch_script_runs_alone_like_ray_submit_copies_it(tmp_path):
    """`ray submit` copies only launch/sweep.py: it must work from any directory on its own."""
    shutil.copy(ROOT / "launch" / "sweep.py", tmp_path / "sweep.py")
    raw = quickstart()
    raw["optuna"]["sampler"] = "cmaes"
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "sweep.py", "--space", "x.yaml", "--address", "auto"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "rayprune: error: x.yaml: optuna.sampler: Input should be 'tpe', 'random', 'gp' or 'nsga2', got 'cmaes'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.py", "x.yaml"]


# --------------------------------------------------------------------------------------------
# launch/cluster.yaml
# --------------------------------------------------------------------------------------------


def cluster() -> dict:
    return yaml.safe_load((ROOT / "launch" / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(cluster()))  # what `ray up` does before launching anything


def test_cluster_schema_check_can_fail():
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    broken = cluster()
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(fillout_defaults(broken))


def test_cluster_installs_the_package_and_runs_mlflow_on_the_head():
    cfg = cluster()
    assert cfg["provider"]["type"] == "aws"
    assert cfg["file_mounts"] == {"~/rayprune": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    setup = "\n".join(cfg["setup_commands"])
    assert "-r ~/rayprune/requirements.txt" in setup and "-e ~/rayprune" in setup
    head_start = "\n".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "mlflow server" in head_start and "--port 5000" in head_start
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(
        "InstanceType" in t["node_config"] and t["node_config"]["InstanceType"].startswith("g")
        for t in cfg["available_node_types"].values()
    )


def test_unreachable_tracking_server_stops_the_cli_before_ray(tmp_path, monkeypatch, capsys):
    import socket

    import ray

    from rayprune.cli import sweep_main as main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.yaml").write_text((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    assert main(["--space", "q.yaml", "--mlflow-uri", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rayprune: error: cannot reach the MLflow tracking server at http://127.0.0.1:{port} ")
    assert err.count("\n") == 1
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.yaml"]


def test_search_spaces_readme_lists_every_key_of_the_schema():
    """The sweep-file reference next to the sweep files names every key the schema accepts."""
    from pathlib import Path

    from pydantic import BaseModel

    from rayprune.orchestration.config import SweepConfig

    readme = (Path(__file__).resolve().parents[1] / "search_spaces" / "README.md").read_text()

    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            options = (
                ()
                if typing.get_origin(field.annotation) is list
                else getattr(field.annotation, "__args__", (field.annotation,))
            )
            nested = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
            if nested and name != "scheduler":  # scheduler's keys are listed in one row
                out += keys(nested[0], f"{prefix}{name}.")
            else:
                out.append(prefix + name)
        return out

    listed = set(re.findall(r"`([a-z_.]+)`", readme))
    missing = [k for k in keys(SweepConfig) if k not in listed]
    assert "grid.flops_targets" in keys(SweepConfig) and missing == []
