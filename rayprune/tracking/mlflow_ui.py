"""MLflow's web UI: the experiment tags that make it open on the fine-tuned candidates, and the links to them.

Pure Python (no MLflow import): the CLI builds links before Ray or MLflow start.

MLflow 3.17's UI picks its GenAI or model-training mode from the URL's ``workflowType``
parameter, else from the browser's local storage (default GenAI), and ignores the experiment's
``mlflow.experimentKind`` tag while its workflow navigation is on. So rayprune

* tags its experiments ``mlflow.experimentKind = custom_model_development`` (what later MLflow
  versions read);
* keeps a *saved view* on each experiment, :data:`CANDIDATES_VIEW_ID`: the fine-tune runs
  (``finetune-<cell>``) with the columns of :data:`CANDIDATE_COLUMNS`, sorted by MACs;
* prints links with ``?workflowType=machine_learning&viewStateShareKey=<view>``
  (:func:`candidates_link`).

The saved view's stored format is MLflow's (its UI bundle, ``mlflow/server/js/build``): the
experiment tag ``mlflow.sharedViewState.<id>`` holds the JSON envelope ``{"name", "createdAt",
"updatedAt", "state"}`` (times in ms), ``state`` being the JSON of the runs page's search facets
(``searchFilter``, ``orderByKey``, ...) and UI state (``selectedColumns``, ...); a column is
``<params|metrics|tags|attributes>.`<name>```. ``tests/test_mlflow_ui.py`` pins these against the
installed MLflow, so an upgrade that changes them fails there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlparse

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY_PARAM = "viewStateShareKey"
WORKFLOW_PARAM = "workflowType"
#: The ``workflowType`` of MLflow's model-training mode (its other value is ``genai``).
MODEL_TRAINING = "machine_learning"
CANDIDATES_VIEW_ID = "rayprune-candidates"
CANDIDATES_VIEW_NAME = "rayprune: fine-tuned candidates"
#: The runs the view lists: one fine-tune run per grid cell, the sweep's equally-treated candidates.
CANDIDATES_FILTER = "tags.`rayprune.role` = 'finetune'"
#: The view's columns as (kind, name): what the fine-tune runs log (``mlflow_tracker.log_finetuned``).
CANDIDATE_COLUMNS = (
    ("params", "method"),
    ("params", "flops_target"),
    ("params", "kd_weight"),
    ("metrics", "macs_pct"),
    ("metrics", "test_top1"),
    ("metrics", "test_top1_drop"),
    ("metrics", "robust_top1"),
    ("metrics", "latency_ms"),
)
#: The metric the view sorts by, smallest first.
CANDIDATES_ORDER = ("metrics", "macs")


def column_key(kind: str, name: str) -> str:
    """A runs-table column as MLflow's UI names it: ``metrics.`test_top1```."""
    return f"{kind}.`{name}`"


def candidates_view_state() -> dict[str, Any]:
    """The runs page's state that the saved view restores: the search facets (every one, at
    MLflow's defaults but the filter and the order) and the selected columns in their order."""
    columns = [column_key(kind, name) for kind, name in CANDIDATE_COLUMNS]
    return {
        "searchFilter": CANDIDATES_FILTER,
        "orderByKey": column_key(*CANDIDATES_ORDER),
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": columns,
    }


def view_envelope(name: str, state: Mapping[str, Any], created_ms: int, updated_ms: int | None = None) -> str:
    """The value of a ``mlflow.sharedViewState.<id>`` tag: MLflow's saved-view envelope."""
    updated = created_ms if updated_ms is None else updated_ms
    return json.dumps({"name": name, "createdAt": created_ms, "updatedAt": updated, "state": json.dumps(state)})


def stored_view_state(value: str) -> dict[str, Any] | None:
    """The state a saved-view tag value holds, or None when it is not an uncompressed envelope
    (a view the UI compressed, or not a view at all)."""
    try:
        envelope = json.loads(value)
        state = json.loads(envelope["state"])
    except (ValueError, TypeError, KeyError):
        return None
    return state if isinstance(state, dict) else None


def experiment_ui_tags(existing: Mapping[str, str], now_ms: int) -> dict[str, str]:
    """The experiment tags to set so the UI opens on the candidates: the experiment kind and the
    candidates view, each only when ``existing`` (the experiment's tags) lacks it or holds
    another value. A rewritten view keeps its creation time."""
    tags: dict[str, str] = {}
    if existing.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        tags[EXPERIMENT_KIND_TAG] = EXPERIMENT_KIND
    key = SHARED_VIEW_PREFIX + CANDIDATES_VIEW_ID
    stored = existing.get(key)
    if stored is None or stored_view_state(stored) != candidates_view_state():
        tags[key] = view_envelope(CANDIDATES_VIEW_NAME, candidates_view_state(), _created_ms(stored, now_ms), now_ms)
    return tags


def has_candidates_view(tags: Mapping[str, str]) -> bool:
    """Whether an experiment's ``tags`` hold the candidates view."""
    return SHARED_VIEW_PREFIX + CANDIDATES_VIEW_ID in tags


def _created_ms(stored: str | None, now_ms: int) -> int:
    try:
        created = json.loads(stored or "")["createdAt"]
    except (ValueError, TypeError, KeyError):
        return now_ms
    return created if isinstance(created, int) else now_ms


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------


def ui_base(tracking_uri: str) -> str:
    """The web UI's address for a tracking URI: the server itself, or ``mlflow ui``'s default."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return "http://127.0.0.1:5000"


def runs_link(tracking_uri: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's runs page in model-training mode, on the saved ``view`` when given."""
    query = {WORKFLOW_PARAM: MODEL_TRAINING, **({VIEW_KEY_PARAM: view} if view else {})}
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def candidates_link(tracking_uri: str, experiment_id: str) -> str:
    """The fine-tuned candidates with their metrics, sorted by MACs (the candidates view)."""
    return runs_link(tracking_uri, experiment_id, CANDIDATES_VIEW_ID)


__all__ = [
    "CANDIDATES_VIEW_ID",
    "CANDIDATE_COLUMNS",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "SHARED_VIEW_PREFIX",
    "candidates_link",
    "candidates_view_state",
    "column_key",
    "experiment_ui_tags",
    "has_candidates_view",
    "runs_link",
    "stored_view_state",
    "ui_base",
    "view_envelope",
]
