"""The cluster launch path without a cluster (issue 15): cluster.yaml binds nothing publicly and
restarts the head's MLflow server cleanly; the documented submit lines work as written; a
``--space`` the user's shell expanded for another home falls back to the package's copy; the
browse hint of an HTTP store names the server; a driver joining a cluster logs to the head's
server instead of its database."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from rayprune.orchestration import cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "launch" / "cluster.yaml"
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    CLUSTER_YAML,
    ROOT / "launch" / "sweep.py",
    *sorted((ROOT / "search_spaces").glob("*.yaml")),
]


# --------------------------------------------------------------------------------------------
# cluster.yaml
# --------------------------------------------------------------------------------------------


def test_cluster_yaml_binds_nothing_to_all_interfaces_unless_a_comment_says_why():
    lines = CLUSTER_YAML.read_text().splitlines()
    for i, line in enumerate(lines):
        if "0.0.0.0" in line.split("#")[0]:
            explained = "#" in line or (i and lines[i - 1].strip().startswith("#") and "0.0.0.0" in lines[i - 1])
            assert explained, f"cluster.yaml line {i + 1} binds 0.0.0.0 without a comment saying why: {line}"
    head = yaml.safe_load(CLUSTER_YAML.read_text())["head_start_ray_commands"]
    (ray_start,) = [c for c in head if "ray start --head" in c]
    (mlflow,) = [c for c in head if "mlflow server" in c]
    assert "--dashboard-host=127.0.0.1" in ray_start
    assert "--host 127.0.0.1" in mlflow and "--port 5000" in mlflow


def test_cluster_yaml_stops_the_previous_mlflow_server_before_starting_one():
    head = yaml.safe_load(CLUSTER_YAML.read_text())["head_start_ray_commands"]
    stop = next(i for i, c in enumerate(head) if "kill -TERM" in c and "mlflow_server.pid" in c)
    start = next(i for i, c in enumerate(head) if "mlflow server" in c)
    assert stop < start
    assert "echo $$ > ~/.rayprune/mlflow_server.pid" in head[start] and head[start].startswith("setsid ")
    # ... and says where the server is, for drivers that join the cluster
    record = next(c for c in head if cluster.HEAD_MLFLOW_FILE in c)
    assert '"uri": "http://127.0.0.1:5000"' in record and "sqlite:///%s/mlflow.db" in record


def test_the_documented_submit_lines_name_the_sweep_file_relative_to_the_heads_home():
    for doc in DOCS:
        text = doc.read_text()
        assert not re.search(r"--space\s+~", text), f"{doc.name}: --space ~/... is expanded by the user's shell"
        for match in re.finditer(r"ray submit \S+ launch/sweep.py -- [^\n]*?--space (\S+)", text):
            assert match.group(1) == shlex.quote(match.group(1)) or match.group(1).startswith('"'), doc.name
            path = shlex.split(match.group(1))[0]
            assert path.startswith("rayprune/search_spaces/"), f"{doc.name}: {path}"
            if "FILE" not in path:  # the shipped file exists where file_mounts puts the repository
                assert (ROOT / path.removeprefix("rayprune/")).is_file(), path


def test_the_docs_document_port_forwards_and_the_jobs_path():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert "ray attach launch/cluster.yaml -p 5000" in doc and "ray dashboard launch/cluster.yaml" in doc
    jobs = re.search(r"ray job submit [^\n]*--working-dir \.(?:[^\n]*\\\n)*[^\n]*", doc)
    assert jobs and "--mlflow-uri" in jobs.group(0) and "--storage-path" in jobs.group(0)


# --------------------------------------------------------------------------------------------
# --space
# --------------------------------------------------------------------------------------------


def test_a_space_path_from_another_home_falls_back_to_the_packages_copy_with_a_warning():
    given = "/home/nobody-here/rayprune/search_spaces/quickstart.yaml"
    path, warning = cluster.resolve_space(given)
    assert path == ROOT / "search_spaces" / "quickstart.yaml"
    assert warning.startswith(f"rayprune: warning: --space {given}: no such file on this machine; using {path} ")
    assert cluster.resolve_space(path) == (path, None)  # an existing path stays as it is
    for missing in ("/elsewhere/search_spaces/nope.yaml", "/elsewhere/quickstart.yaml"):
        assert cluster.resolve_space(missing) == (Path(missing), None)


def test_the_sweep_command_uses_the_fallback_and_says_so(monkeypatch, capsys):
    from rayprune.cli import main
    from rayprune.orchestration import sweep

    seen = {}

    def fake_run_sweep(cfg, **kwargs):
        seen["cfg"] = cfg
        return sweep.SweepOutcome("quickstart-1", "/x", "run", True, cfg.num_trials())

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    given = "/home/alice/rayprune/search_spaces/quickstart.yaml"
    assert main(["sweep", "--space", given]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        f"rayprune: warning: --space {given}: no such file on this machine; using "
        f"{ROOT / 'search_spaces' / 'quickstart.yaml'} "
    )
    assert seen["cfg"].name == "quickstart"
    assert main(["sweep", "--space", "/home/alice/elsewhere/quickstart.yaml"]) == 2  # no fallback: one line
    assert capsys.readouterr().err == (
        "rayprune: error: /home/alice/elsewhere/quickstart.yaml: no such sweep file (see search_spaces/ for examples)\n"
    )


# --------------------------------------------------------------------------------------------
# Browsing the runs
# --------------------------------------------------------------------------------------------


def test_the_browse_hint_of_a_server_is_its_url_and_the_port_forward():
    hint = cluster.browse_hint("http://127.0.0.1:5000", "7")
    assert "mlflow ui" not in hint and "--backend-store-uri" not in hint
    assert hint.splitlines()[0] == "Browse the runs: the MLflow server at http://127.0.0.1:5000"
    assert "ray attach launch/cluster.yaml -p 5000" in hint and "ssh -N -L 5000:127.0.0.1:5000 HEAD" in hint
    assert hint.splitlines()[2:] == [
        "  then open the fine-tuned candidates with their metrics, sorted by MACs: http://127.0.0.1:5000/#/experiments/7/"
        "runs?workflowType=machine_learning&viewStateShareKey=rayprune-candidates",
        "  every run of the experiment: http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning",
    ]
    remote = cluster.browse_hint("https://mlflow.example.org/", "7")
    assert remote.splitlines()[0] == "Browse the runs: the MLflow server at https://mlflow.example.org"
    assert "port" not in remote and "https://mlflow.example.org/#/experiments/7/runs" in remote
    local = cluster.browse_hint("sqlite:////data/mlflow.db", "3")
    assert local.splitlines()[0] == "Browse the runs: mlflow ui --backend-store-uri sqlite:////data/mlflow.db"
    assert local.splitlines()[1:] == [
        "  then open the fine-tuned candidates with their metrics, sorted by MACs: http://127.0.0.1:5000/#/experiments/3/"
        "runs?workflowType=machine_learning&viewStateShareKey=rayprune-candidates",
        "  every run of the experiment: http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning",
    ]


# --------------------------------------------------------------------------------------------
# The default store on a joined cluster
# --------------------------------------------------------------------------------------------


@pytest.fixture
def head_server(tmp_path, monkeypatch):
    """This machine is a head whose cluster.yaml started an MLflow server on $HOME/mlflow.db."""
    home = tmp_path / "home"
    (home / ".rayprune").mkdir(parents=True)
    record = {"uri": "http://127.0.0.1:5999", "backend_store_uri": f"sqlite:///{home}/mlflow.db"}
    (home / ".rayprune" / "mlflow_server.json").write_text(json.dumps(record) + "\n")
    monkeypatch.setenv(cluster.HEAD_MLFLOW_ENV, str(home / ".rayprune" / "mlflow_server.json"))
    monkeypatch.chdir(home)  # where `ray submit` runs the driver
    return home


def test_a_joined_driver_logs_to_the_heads_server_instead_of_its_database(head_server):
    own = f"sqlite:///{head_server}/mlflow.db"
    uri, note = cluster.tracking_uri_on_cluster(own, None, "auto")
    assert uri == "http://127.0.0.1:5999"
    assert note == (
        f"rayprune: this cluster's head runs an MLflow server at http://127.0.0.1:5999; the sweep logs "
        f"there instead of its database {own} (pass --mlflow-uri to choose another store)"
    )
    assert cluster.tracking_uri_on_cluster("sqlite:///mlflow.db", None, "auto")[0] == "http://127.0.0.1:5999"
    with pytest.raises(
        cluster.LaunchError,
        match=r"^--mlflow-uri sqlite:///mlflow.db is the database of the MLflow "
        r"server this cluster's head runs \(http://127.0.0.1:5999\); .* "
        r"pass --mlflow-uri http://127.0.0.1:5999 \(or another database\)$",
    ):
        cluster.tracking_uri_on_cluster(own, "sqlite:///mlflow.db", "auto")
    other = f"sqlite:///{head_server}/elsewhere.db"  # another file stays allowed, given or configured
    assert cluster.tracking_uri_on_cluster(other, other, "auto") == (other, None)
    assert cluster.tracking_uri_on_cluster(other, None, "auto") == (other, None)
    assert cluster.tracking_uri_on_cluster(own, None, None) == (own, None)  # a local Ray: as configured
    assert cluster.tracking_uri_on_cluster("http://10.0.0.5:5000", None, "auto") == ("http://10.0.0.5:5000", None)


def test_without_a_head_server_record_a_joined_driver_keeps_its_store(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.HEAD_MLFLOW_ENV, str(tmp_path / "absent.json"))
    own = f"sqlite:///{tmp_path}/mlflow.db"
    assert cluster.tracking_uri_on_cluster(own, own, "auto") == (own, None)


def test_the_sweep_command_refuses_the_heads_database_and_defaults_to_its_server(head_server, monkeypatch, capsys):
    from rayprune.cli import main
    from rayprune.orchestration import sweep

    seen = {}

    def fake_run_sweep(cfg, **kwargs):
        seen["uri"] = cfg.tracking.uri
        return sweep.SweepOutcome("quickstart-1", "/x", "run", True, cfg.num_trials())

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(cluster, "wait_for_tracking_server", lambda uri, address: None)  # no server runs here
    space = str(ROOT / "search_spaces" / "quickstart.yaml")  # tracking.uri: sqlite:///mlflow.db
    assert main(["sweep", "--space", space, "--address", "auto"]) == 0
    assert seen["uri"] == "http://127.0.0.1:5999"
    assert "rayprune: this cluster's head runs an MLflow server at http://127.0.0.1:5999" in capsys.readouterr().err
    seen.clear()
    assert (
        main(["sweep", "--space", space, "--address", "auto", "--mlflow-uri", f"sqlite:///{head_server}/mlflow.db"])
        == 2
    )
    assert capsys.readouterr().err.startswith(
        f"rayprune: error: --mlflow-uri sqlite:///{head_server}/mlflow.db is "
        "the database of the MLflow server this cluster's head runs"
    )
    assert not seen and not (head_server / "mlflow.db").exists()
