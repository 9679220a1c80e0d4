"""The pick's MLflow model: an exported subnet registered as an ONNX model under an alias."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from . import TrackingError
from .lookup import PARENT_TAG, ROLE_TAG, SWEEP_TAG
from .store import row_key

TRACKING_ENV, REGISTRY_ENV = "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"
#: What the logged ONNX model imports to serve (MLflow adds itself): the packages MLflow's own
#: inference finds, which costs a subprocess that loads the model (over ten seconds on a busy CPU).
SERVING_PACKAGES = ("numpy", "onnx", "onnxruntime")


def serving_requirements() -> list[str]:
    """:data:`SERVING_PACKAGES` pinned to the installed versions, local labels (``+cpu``) dropped
    to stay installable from PyPI, as MLflow pins them."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def register_choice(
    client: MlflowClient,
    parent: Any,
    model_name: str,
    alias: str,
    export_dir: str | Path,
    row: dict[str, Any],
    description: str,
    input_size: int,
    preprocessing: dict[str, Any] | None = None,
) -> Any:
    """Register an exported subnet as an MLflow model that ``mlflow.pyfunc`` loads and serves.

    A ``pick`` child run of the sweep's ``parent`` run gets the export's files (spec.json,
    weights.pt, model.onnx, model_card.md) under ``export/`` and the row's metrics; the ONNX
    graph is logged with ``mlflow.onnx.log_model`` (no pickled code), with a signature (float32
    ``[-1, C, input_size, input_size]`` -> logits, ``input_size`` the side the subnet was trained
    at, which the export's ONNX input must have) and an input example of that shape; a model
    version is created from it and ``model_name@alias`` points at it. What a served model expects
    (:func:`serving_contract`: input size, mean, std and, where known, class names) is in the
    signature's params (their defaults; predict ignores them) and in the model's metadata.
    Returns the ModelVersion."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    export_dir = Path(export_dir)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=f"pick-{alias}",
        tags={
            PARENT_TAG: parent.info.run_id,
            ROLE_TAG: "pick",
            SWEEP_TAG: parent.data.tags.get(SWEEP_TAG, ""),
            "rayprune.mode": alias,
            "rayprune.source_key": row_key(row),
        },
    )
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(export_dir), "export")
        client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), int(time.time() * 1000), 0)
                for k, v in {"macs": row["macs"], "params": row["params"], **row["metrics"]}.items()
            ],
        )
        session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        shape = example_shape(session.get_inputs()[0].shape, input_size)
        example = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        contract = serving_contract(input_size, preprocessing)
        logits = session.run(None, {session.get_inputs()[0].name: example})[0]
        signature = infer_signature(example, {"logits": logits}, params=contract)
        # The registry resolves the logged model through the fluent tracking URI: all inside.
        with _fluent(client):
            with mlflow.start_run(run_id=run_id, nested=True):
                info = mlflow.onnx.log_model(
                    onnx.load(str(export_dir / "model.onnx")),
                    name="model",
                    signature=signature,
                    input_example=example,
                    onnx_execution_providers=["CPUExecutionProvider"],
                    save_as_external_data=False,
                    pip_requirements=serving_requirements(),
                    metadata={"rayprune_input": contract},
                )
            try:
                client.create_registered_model(model_name, description="rayprune operating points (pick)")
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(
                model_name,
                source=info.model_uri,
                run_id=run_id,
                description=description,
                model_id=info.model_id,
                tags={"rayprune.mode": alias, "rayprune.source_key": row_key(row)},
            )
            client.set_registered_model_alias(model_name, alias, version.version)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return version


def serving_contract(input_size: int, preprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """What the served model expects: ``input_size`` and, from the record's ``preprocessing``,
    ``mean``, ``std`` and ``class_names`` (the ones it records)."""
    contract: dict[str, Any] = {"input_size": int(input_size)}
    for key in ("mean", "std", "class_names"):
        if (preprocessing or {}).get(key):
            contract[key] = list(preprocessing[key])  # type: ignore[index]  # checked just above
    return contract


def example_shape(onnx_shape: list[Any], input_size: int) -> list[int]:
    """``[1, C, input_size, input_size]`` for an ONNX input ``[batch, C, H, W]`` (a named dim is
    dynamic); an export whose fixed H or W is not ``input_size`` is refused."""
    channels, height, width = onnx_shape[1:]
    if any(isinstance(d, int) and d != input_size for d in (height, width)):
        raise TrackingError(
            f"the exported ONNX input is {height}x{width}, not the {input_size}x{input_size} the subnet was "
            "trained at; export it again at its input size"
        )
    return [1, int(channels), input_size, input_size]


@contextlib.contextmanager
def _fluent(client: MlflowClient) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.onnx.log_model``) at the client's store for a while.

    MLflow's setters also export ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``, and restoring
    ``get_tracking_uri()`` would pin the default (``sqlite:///mlflow.db`` resolved against *this*
    working directory) for the rest of the process. So what is restored is what the process had
    before: the environment variables, set or absent (None makes MLflow fall back to them)."""
    import mlflow

    before = {name: os.environ.get(name) for name in (TRACKING_ENV, REGISTRY_ENV)}
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[TRACKING_ENV])  # type: ignore[arg-type]  # MLflow takes None: unset
        mlflow.set_registry_uri(before[REGISTRY_ENV])  # type: ignore[arg-type]  # MLflow takes None: unset
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
