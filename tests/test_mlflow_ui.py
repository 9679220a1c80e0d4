"""MLflow's web UI opens rayprune's links on the fine-tuned candidates with their metrics.

* The saved view's stored format, pinned against the installed MLflow's UI bundle: an upgrade
  that changes it fails here (see :mod:`rayprune.tracking.mlflow_ui`).
* The experiment tags, when a sweep creates an experiment and when one opens an experiment made
  without them; the links the sweep and ``rayprune front`` print.
* A real browser: ``mlflow ui`` on loopback over a small sweep's store, the printed link loaded in
  headless Chromium (skipped without ``chromium``, except when ``CI=true``); its screenshot is
  written to the test's temporary folder.

The store: an experiment created without rayprune's tags (as an older rayprune left it), then a
sweep in it: the unpruned baseline, a trial, and three fine-tuned candidates logged in an order
that is not their MACs order (B, A, C).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from rayprune import models
from rayprune.cli import main as cli_main
from rayprune.methods.base import SubnetRecord
from rayprune.orchestration.cluster import browse_hint
from rayprune.tracking import mlflow_ui
from rayprune.tracking.lookup import connect
from rayprune.tracking.mlflow_tracker import SweepTracker
from rayprune.tracking.mlflow_ui import (
    CANDIDATE_COLUMNS,
    candidates_link,
    candidates_view_state,
    column_key,
    experiment_ui_tags,
    runs_link,
    view_envelope,
)

EXPERIMENT = "ui-mini"
TINY = models.full_spec("cifar_resnet:tiny")
VIEW_TAG = mlflow_ui.SHARED_VIEW_PREFIX + mlflow_ui.CANDIDATES_VIEW_ID
KIND_TAG = mlflow_ui.EXPERIMENT_KIND_TAG
#: (cell, s2.b0.mid width, flops target, kd weight, test, robust, latency), in logging order.
CANDIDATES = [
    ("random_f0.7_kd0.9", 16, 0.7, 0.9, 0.85, 0.65, 1.5),
    ("random_f0.5_kd0", 8, 0.5, 0.0, 0.80, 0.58, 1.0),
    ("random_f0.9_kd0", 24, 0.9, 0.0, 0.88, 0.68, 2.5),
]
BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
CHROMIUM = shutil.which("chromium")


def subnet(width: int) -> dict:
    return models.with_widths(TINY, {"s2.b0.mid": width})


def log_sweep(tracker: SweepTracker) -> None:
    tracker.start_sweep("sweep-ui", {"seed": 3}, {})
    base = {"test_top1": 0.9, "robust_top1": 0.7, "latency_ms_b1_p50": 2.0}
    tracker.log_unpruned(SubnetRecord.of(TINY, base, "unpruned", 0).to_dict())
    tracker.trial_started("t-search", {"method": "random", "flops_target": 0.5, "kd_weight": 0.0})
    tracker.trial_finished("t-search", status="FAILED", refresh_front=False)
    for cell, width, target, kd, test, robust, latency in CANDIDATES:
        metrics = {"test_top1": test, "robust_top1": robust, "latency_ms_b1_p50": latency}
        record = SubnetRecord.of(subnet(width), metrics, "random", 0).to_dict()
        tracker.log_finetuned(record, trial_id=f"t-{cell}", cell=cell, flops_target=target, kd_weight=kd)
    tracker.finish()


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    """An MLflow store with the experiment made without rayprune's tags (as an older rayprune left it)."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = connect(uri)
    made_elsewhere = client.create_experiment(EXPERIMENT, artifact_location=str(tmp / "mlartifacts"))
    return {"tmp": tmp, "uri": uri, "client": client, "tags_before": dict(client.get_experiment(made_elsewhere).tags)}


@pytest.fixture(scope="module")
def store(schema):
    """The schema's store after a sweep in its experiment (:func:`log_sweep`)."""
    tracker = SweepTracker(schema["uri"], EXPERIMENT, schema["tmp"] / "work")
    log_sweep(tracker)
    return {**schema, "tracker": tracker}


# --------------------------------------------------------------------------------------------
# In a browser
# --------------------------------------------------------------------------------------------


class UiServer:
    """``mlflow ui`` over a store on a free loopback port, started in the background."""

    def __init__(self, uri: str, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        self.base, self.log = f"http://127.0.0.1:{port}", log
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: none is used
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_until_serving(self, timeout_s: float = 180.0) -> str:
        """The base URL, once the server answers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow ui exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self.base
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"mlflow ui did not answer within {timeout_s:g} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def chromium() -> str:
    """The ``chromium`` executable; skips without one, except with ``CI=true``, where it fails."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no chromium (apt-get install -y chromium); with CI=true this fails")
    return CHROMIUM


@pytest.fixture(scope="module")
def ui_server(chromium, schema):
    """``mlflow ui`` over the schema's store, started before the sweep is logged into it when a test
    asks for this fixture before ``store``: its seconds of start-up overlap the logging."""
    server = UiServer(schema["uri"], schema["tmp"] / "mlflow_ui.log")
    yield server
    server.stop()


def load_in_chromium(chromium: str, url: str, tmp: Path) -> str:
    """The page's DOM after its scripts ran; its screenshot goes to ``tmp/page.png``."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--virtual-time-budget=15000",
        # wide enough that the table renders every column (it leaves off-screen ones out of the DOM)
        "--window-size=2000,900",
        f"--screenshot={tmp / 'page.png'}",
        "--dump-dom",
    ]
    done = subprocess.run([chromium, *flags, url], capture_output=True, text=True, timeout=180, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment))).strip()


def table_rows(dom: str) -> dict[str, dict[str, str]]:
    """The runs table's cells as run id -> column id -> shown text (the grid splits a row over
    its pinned and scrolling parts, so a run's cells are gathered from every part)."""
    rows: dict[str, dict[str, str]] = {}
    parts = re.split(r'(<div[^>]*role="row"[^>]*>)', dom)
    for opening, body in zip(parts[1::2], parts[2::2], strict=True):
        run_id = re.search(r'row-id="([^"]+)"', opening)
        if run_id is None:
            continue
        cells = re.split(r'<div[^>]*role="gridcell"[^>]*col-id="([^"]+)"[^>]*>', body)
        for column, content in zip(cells[1::2], cells[2::2], strict=True):
            rows.setdefault(run_id.group(1), {})[column] = text_of(content)
    return rows


def row_order(dom: str) -> list[str]:
    found = dict(re.findall(r'role="row" row-index="(\d+)" row-id="([^"]+)"', dom))
    return [found[i] for i in sorted(found, key=int)]


#: A header cell of the runs table: its column id, then its label (the next sort-header span in it).
HEADER = re.compile(
    r'role="columnheader"[^>]*col-id="([^"]+)"[^>]*>(?:(?!col-id=).)*?data-testid="sort-header-[^"]*">([^<]*)<', re.S
)


def column_headers(dom: str) -> dict[str, str]:
    return dict(HEADER.findall(dom))


# First in the module, so that its server starts before the store fixture logs the sweep.
@pytest.mark.slow
def test_the_printed_link_opens_the_candidates_table_in_chromium(chromium, ui_server, store, tmp_path, capsys):
    tracker, experiment_id = store["tracker"], store["tracker"].experiment_id
    base = ui_server.wait_until_serving()
    assert cli_main(["front", "--experiment", EXPERIMENT, "--mlflow-uri", base]) == 0
    line = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    link = (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=rayprune-candidates"
    )
    assert line == f"the fine-tuned candidates in MLflow's UI: {link}"

    dom = load_in_chromium(chromium, link, tmp_path)

    assert re.search(r"<title>([^<]*)</title>", dom).group(1) == f"Runs - Experiment {experiment_id} - MLflow"
    page = text_of(dom)
    assert "You're viewing a shared view." in page and "rayprune: fine-tuned candidates" in page
    assert "Token Usage" not in page and "Detect Issues" not in page  # not the GenAI overview
    headers = column_headers(dom)
    assert {column_key(kind, name): name for kind, name in CANDIDATE_COLUMNS}.items() <= headers.items()
    # the fine-tune runs only, smallest MACs first: A (width 8), B (16), C (24)
    by_cell = tracker.runs.member_runs
    assert row_order(dom) == [by_cell["random_f0.5_kd0"], by_cell["random_f0.7_kd0.9"], by_cell["random_f0.9_kd0"]]
    rows = table_rows(dom)
    shown = {
        cell: [rows[run_id][column_key(kind, name)] for kind, name in CANDIDATE_COLUMNS if name != "macs_pct"]
        for cell, run_id in by_cell.items()
    }
    assert shown == {
        "random_f0.5_kd0": ["random", "0.5", "0.0", "0.8", "0.1", "0.58", "1"],
        "random_f0.7_kd0.9": ["random", "0.7", "0.9", "0.85", "0.05", "0.65", "1.5"],
        "random_f0.9_kd0": ["random", "0.9", "0.0", "0.88", "0.02", "0.68", "2.5"],
    }
    for cell, run_id in by_cell.items():
        width = next(w for c, w, *_ in CANDIDATES if c == cell)
        assert rows[run_id]["attributes.`Run Name`"].split()[-1] == f"finetune-{cell}"  # after its colour label
        pct = float(rows[run_id]["metrics.`macs_pct`"])
        assert pct == pytest.approx(100 * models.macs(subnet(width)) / models.macs(TINY), rel=1e-9)
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# The stored format, pinned against the installed MLflow UI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> str:
    files = sorted(BUNDLE.glob("*.js"))
    assert files, f"no MLflow UI bundle under {BUNDLE}"
    return "\n".join(f.read_text(errors="replace") for f in files)


def the_list(bundle: str, *first: str) -> list[str]:
    """The one string array literal of the bundle that starts with the strings ``first``."""
    start = ",".join(f'"{item}"' for item in first)
    found = set(re.findall(r"\[" + re.escape(start) + r'(?:,"[A-Za-z]+")*\]', bundle))
    assert len(found) == 1, f"the MLflow UI bundle has {len(found)} lists starting with {start}, not 1"
    return json.loads(found.pop())


def test_the_saved_view_is_stored_as_the_installed_mlflow_ui_reads_it(bundle):
    # the tag and the link parameter
    assert re.search(r'="viewStateShareKey",[\w$]+="mlflow\.sharedViewState\."', bundle)
    assert mlflow_ui.VIEW_KEY_PARAM == "viewStateShareKey" and mlflow_ui.SHARED_VIEW_PREFIX == "mlflow.sharedViewState."
    # the envelope: written as {name, createdAt, updatedAt, state}, read only with a string name and
    # state and a numeric createdAt
    assert re.search(r"JSON\.stringify\(\{name:[\w$]+,createdAt:[\w$]+,updatedAt:[\w$]+,state:[\w$]+\}\)", bundle)
    assert re.search(
        r'"string"!==typeof ([\w$]+)\.name\|\|"number"!==typeof \1\.createdAt\|\|"string"!==typeof \1\.state', bundle
    )
    envelope = json.loads(view_envelope("v", candidates_view_state(), 1700000000000))
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"}
    assert isinstance(envelope["state"], str) and isinstance(envelope["createdAt"], int)
    # the state: the runs page's search facets (all of them in ours) and its UI state
    facets = the_list(bundle, "searchFilter")
    ui_keys = the_list(bundle, "selectedColumns", "columnOrder")
    state = json.loads(envelope["state"])
    assert set(facets) <= set(state) and set(state) <= set(facets) | set(ui_keys)
    # the facets' values as the UI's defaults and its URL serializer take them
    assert re.search(r'\{ATTRIBUTES:"attributes",PARAMS:"params",METRICS:"metrics",TAGS:"tags"\}', bundle)
    assert re.search(r'\(([\w$]+),([\w$]+)\)=>\1\+"\.`"\+\2\+"`"', bundle)  # a column: kind.`name`
    assert column_key("metrics", "test_top1") == "metrics.`test_top1`"
    assert (
        re.search(r"orderByAsc:\{serializeQueryString:([\w$]+)=>\1\.toString\(\)", bundle)
        and state["orderByAsc"] is True
    )
    assert 'ACTIVE="Active"' in bundle and 'ALL_RUNS="All Runs"' in bundle and '="ALL"' in bundle
    assert (state["lifecycleFilter"], state["modelVersionFilter"], state["startTime"]) == ("Active", "All Runs", "ALL")
    assert state["datasetsFilter"] == [] and re.search(r"datasetsFilter:\[\]", bundle)
    # model-training mode from the URL
    assert 'MACHINE_LEARNING="machine_learning"' in bundle and '.get("workflowType")' in bundle


def test_the_view_lists_the_candidates_with_their_metrics_sorted_by_macs():
    state = candidates_view_state()
    expected = [
        "params.`method`",
        "params.`flops_target`",
        "params.`kd_weight`",
        "metrics.`macs_pct`",
        "metrics.`test_top1`",
        "metrics.`test_top1_drop`",
        "metrics.`robust_top1`",
        "metrics.`latency_ms`",
    ]
    assert state["selectedColumns"] == state["columnOrder"] == expected
    assert state["searchFilter"] == "tags.`rayprune.role` = 'finetune'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`macs`", True)


def test_experiment_tags_are_written_only_when_missing_or_changed():
    created = experiment_ui_tags({}, 1000)
    assert created[KIND_TAG] == "custom_model_development"
    envelope = json.loads(created[VIEW_TAG])
    assert envelope == {
        "name": "rayprune: fine-tuned candidates",
        "createdAt": 1000,
        "updatedAt": 1000,
        "state": json.dumps(candidates_view_state()),
    }
    assert experiment_ui_tags(created, 2000) == {}
    stale = view_envelope("rayprune: fine-tuned candidates", {"searchFilter": ""}, 500)
    rewritten = experiment_ui_tags({KIND_TAG: "genai_development", VIEW_TAG: stale}, 3000)
    assert rewritten[KIND_TAG] == "custom_model_development"
    assert json.loads(rewritten[VIEW_TAG])["createdAt"] == 500 and json.loads(rewritten[VIEW_TAG])["updatedAt"] == 3000
    assert json.loads(experiment_ui_tags({VIEW_TAG: "not json"}, 4000)[VIEW_TAG])["createdAt"] == 4000


# --------------------------------------------------------------------------------------------
# The experiment and the printed links
# --------------------------------------------------------------------------------------------


def test_a_sweep_tags_the_experiment_it_creates_and_one_made_without_the_tags(store, tmp_path):
    client = store["client"]
    assert KIND_TAG not in store["tags_before"] and VIEW_TAG not in store["tags_before"]
    opened = client.get_experiment(store["tracker"].experiment_id).tags
    assert opened[KIND_TAG] == "custom_model_development"
    assert json.loads(json.loads(opened[VIEW_TAG])["state"]) == candidates_view_state()
    fresh = SweepTracker(store["uri"], "ui-fresh", tmp_path)
    tags = client.get_experiment(fresh.experiment_id).tags
    assert tags[KIND_TAG] == "custom_model_development" and VIEW_TAG in tags


def test_candidate_runs_log_their_drop_from_the_baseline(store):
    client, tracker = store["client"], store["tracker"]
    drops = {
        cell: client.get_run(run_id).data.metrics["test_top1_drop"] for cell, run_id in tracker.runs.member_runs.items()
    }
    assert drops == {"random_f0.7_kd0.9": 0.05, "random_f0.5_kd0": 0.1, "random_f0.9_kd0": 0.02}


def test_links_open_the_runs_in_model_training_mode_on_the_view():
    assert candidates_link("sqlite:////data/mlflow.db", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=rayprune-candidates"
    )
    assert runs_link("https://mlflow.example.org/", "7") == (
        "https://mlflow.example.org/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_front_prints_the_link_the_sweep_prints(store, capsys):
    uri, experiment_id = store["uri"], store["tracker"].experiment_id
    assert cli_main(["front", "--experiment", EXPERIMENT, "--mlflow-uri", uri]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    link = candidates_link(uri, experiment_id)
    assert last == f"the fine-tuned candidates in MLflow's UI (serve it: mlflow ui --backend-store-uri {uri}): {link}"
    assert (
        f"  then open the fine-tuned candidates with their metrics, sorted by MACs: {link}"
        in browse_hint(uri, experiment_id).splitlines()
    )


def test_front_links_the_runs_of_an_experiment_without_the_view(store, capsys):
    client, experiment_id = store["client"], store["tracker"].experiment_id
    saved = client.get_experiment(experiment_id).tags[VIEW_TAG]
    client.delete_experiment_tag(experiment_id, VIEW_TAG)
    try:
        assert cli_main(["front", "--experiment", EXPERIMENT, "--mlflow-uri", store["uri"]]) == 0
    finally:
        client.set_experiment_tag(experiment_id, VIEW_TAG, saved)
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last.endswith(f"): {runs_link(store['uri'], experiment_id)}") and last.startswith("the runs in MLflow's UI")
