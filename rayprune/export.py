"""Export one subnet for deployment: spec.json, weights.pt, model.onnx and model_card.md.

Pure torch + onnx/onnxruntime (no MLflow). Nothing is pickled: the weights are a plain
``state_dict`` (load with ``torch.load(..., weights_only=True)``) and the architecture is the
spec. The ONNX graph is checked against torch with onnxruntime before the directory appears:
everything is written to a temporary sibling directory that is renamed into place only when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import models
from .errors import RaypruneError
from .models import Spec, SpecError, subnet_io

ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-3


class ExportError(RaypruneError):
    """An export that cannot be done (occupied output folder, weights that do not fit the spec,
    an ONNX graph that disagrees with torch); the message names the problem and the fix."""


def build_loaded(spec: Spec, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """``models.build(spec)`` with ``state_dict`` loaded strictly, in eval mode."""
    model = models.build(spec)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(
            f"weights do not match the spec ({first}); export the state_dict saved with this spec"
        ) from None
    return model.eval()


def input_channels(spec: Spec) -> int:
    """Channels of the network's input image (the first layer's input channels)."""
    return models.layers(spec)[0].in_channels


EXPORTERS = ("auto", "dynamo", "torchscript")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, exporter: str = "auto") -> str:
    """Write ``model`` to ``path`` as one ONNX file with a dynamic batch axis; returns the
    exporter used. ``auto`` tries torch's default dynamo exporter and falls back to the legacy
    TorchScript exporter when dynamo cannot trace the graph."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
            return "dynamo"
        except Exception:
            path.unlink(missing_ok=True)
            if exporter == "dynamo":
                raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated and chatty
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return "torchscript"


def check_onnx(path: Path, model: nn.Module, example: torch.Tensor, atol: float = ONNX_ATOL) -> float:
    """Run the ONNX file with onnxruntime on ``example`` and compare with torch; returns the
    largest absolute difference, raising :class:`ExportError` beyond tolerance."""
    import onnxruntime as ort  # heavy; only needed here

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        want = model(example).numpy()
    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=ONNX_RTOL):
        raise ExportError(
            f"ONNX output differs from torch (max |diff| {diff:.2e} > {atol:g}); "
            "the exported graph is wrong, do not deploy it"
        )
    return diff


def export_subnet(
    spec: Spec,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    out_dir: str | Path,
    *,
    input_size: int,
    info: dict[str, Any] | None = None,
    exporter: str = "auto",
    baseline: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` with spec.json, weights.pt (state_dict), model.onnx (checked against
    torch with onnxruntime) and model_card.md (metrics against the unpruned ``baseline`` row,
    the input ``preprocessing``, spec summary, provenance from ``info``: e.g. method, dataset,
    flops_target, kd_weight, recipe, experiment, sweep_id, trial_id, mode, selection).

    ``input_size`` is the side the subnet was trained and measured at (a saved subnet's
    :attr:`~rayprune.models.subnet_io.SavedSubnet.input_size`): the ONNX input is ``[batch, C, input_size,
    input_size]`` and the card's MACs are counted at it. It is required, never the family default,
    so a net trained on 8x8 digits is not exported for 32x32 images.

    ``exporter`` is passed to :func:`export_onnx`. ``out_dir`` must not exist or be empty.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(
            f"output directory {str(out_dir)!r} already exists and is not empty",
            fix="give a new output directory or remove it",
            hint="new_out",
        )
    try:
        models.validate(spec)
    except SpecError as e:
        raise ExportError(f"cannot export: invalid spec: {e}") from None
    model = build_loaded(spec, state_dict)
    size = _checked_input_size(spec, input_size)
    with subnet_io.staged_folder(out_dir) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the export is meant to be shared
        _write_export(tmp, spec, model, metrics, size, info or {}, exporter, baseline, preprocessing)
    return out_dir


def _checked_input_size(spec: Spec, input_size: int) -> int:
    """``input_size`` when the spec runs at it (e.g. avgpool shortcuts need even maps)."""
    try:
        models.layers(spec, input_size)
    except SpecError as e:
        raise ExportError(
            f"cannot export at input size {input_size!r}: {e}",
            fix="give the input size the subnet was trained at",
        ) from None
    return input_size


def _write_export(
    target: Path,
    spec: Spec,
    model: nn.Module,
    metrics: dict[str, Any],
    size: int,
    info: dict[str, Any],
    exporter: str,
    baseline: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    subnet_io.write_files(target, spec, model.state_dict())
    generator = torch.Generator().manual_seed(0)
    channels = input_channels(spec)
    export_example = torch.randn(2, channels, size, size, generator=generator)
    exporter = export_onnx(model, export_example, target / "model.onnx", exporter)
    # A different batch size than the export example proves the batch axis is really dynamic.
    max_diff = check_onnx(target / "model.onnx", model, torch.randn(3, channels, size, size, generator=generator))
    card = model_card(
        spec,
        metrics,
        size,
        info,
        exporter=exporter,
        onnx_max_diff=max_diff,
        baseline=baseline,
        preprocessing=preprocessing,
    )
    (target / "model_card.md").write_text(card)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _about(key: str, value: Any) -> str:
    if key == "flops_target":
        return f"{float(value):g} of the unpruned MACs"
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_card(
    spec: Spec,
    metrics: dict[str, Any],
    input_size: int,
    info: dict[str, Any],
    *,
    exporter: str,
    onnx_max_diff: float,
    baseline: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> str:
    """The markdown model card: what it is (method, dataset, target, KD weight, recipe), its
    metrics beside the unpruned baseline's (drop, MACs %), the exact input preprocessing, the
    spec summary, provenance and how to load the files."""
    macs, params = models.macs(spec, input_size), models.params(spec)
    lines = [f"# rayprune subnet ({info.get('mode', 'exported')})", ""]
    if info.get("selection"):
        lines += [f"Selected by: {info['selection']}", ""]
    about = [
        (k, info.get(k)) for k in ("method", "dataset", "flops_target", "kd_weight", "recipe", "init", "robust_suite")
    ]
    if any(v is not None for _, v in about):
        lines += ["## What it is", "", "| | |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {_about(k, v)} |" for k, v in about if v is not None]
        lines += [""]
    lines += ["## Metrics", ""]
    base_m = (baseline or {}).get("metrics", {})
    if baseline is not None:
        lines += [
            "| metric | this subnet | unpruned baseline | drop |",
            "|---|---|---|---|",
            f"| MACs | {macs:,} ({100.0 * macs / baseline['macs']:.1f} %) | {baseline['macs']:,} (100 %) | |",
            f"| params | {params:,} | {baseline['params']:,} | |",
        ]
        for k, v in sorted(metrics.items()):
            if k in ("macs", "params"):
                continue
            ref = base_m.get(k)
            drop = f"{ref - v:+.4f}" if isinstance(ref, (int, float)) and k.endswith("top1") else ""
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(ref) if ref is not None else '-'} | {drop} |")
    else:
        lines += ["| metric | value |", "|---|---|", f"| MACs | {macs:,} |", f"| params | {params:,} |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if k not in ("macs", "params")]
    lines += [
        "",
        "Accuracies are fractions in [0, 1]: `test_top1` on the held-out test set, `robust_top1` the mean "
        "over the corruption suite, `val_top1` the search-time validation accuracy. The drop is the unpruned "
        "baseline's value minus this subnet's.",
        "",
    ]
    shape = f"{input_channels(spec)}x{input_size}x{input_size}"
    tensor = f"[batch, {input_channels(spec)}, {input_size}, {input_size}]"  # what model.onnx takes
    lines += ["## Input preprocessing", ""]
    if preprocessing:
        p = preprocessing
        lines += [
            f"* input: float32 tensor {tensor}, layout {p.get('layout', 'NCHW')}, "
            f"channel order {p.get('channel_order', 'RGB')}",
            f"* scale: {p.get('scale', 'pixel / 255')} (values in [0, 1]), then per channel (x - mean) / std",
            f"* mean: `{[round(m, 6) for m in p['mean']]}`",
            f"* std: `{[round(x, 6) for x in p['std']]}`",
        ]
        if p.get("class_names"):
            lines += [f"* classes (logit i is class i): `{list(p['class_names'])}`"]
        lines += [""]
    else:
        lines += [f"* input {shape}, normalised like the training data (not recorded for this subnet)", ""]
    lines += [
        "## Architecture",
        "",
        f"* family: `{spec['family']}`, input {shape}, {spec.get('num_classes', '?')} classes",
    ]
    lines += [f"* {k}: `{spec[k]}`" for k in ("block", "shortcut") if k in spec]
    lines += ["", "| channel group | width |", "|---|---|"]
    lines += [f"| {g.name} | {g.width} |" for g in models.channel_groups(spec)]
    lines += ["", "## Provenance", ""]
    shown = ("mode", "selection", "method", "dataset", "flops_target", "kd_weight", "recipe", "init", "robust_suite")
    lines += [f"* {k}: `{v}`" for k, v in info.items() if k not in shown and v is not None]
    lines += [
        f"* spec hash: `{models.spec_hash(spec)}`",
        f"* ONNX exporter: {exporter}; max |onnx - torch| = {onnx_max_diff:.1e} (onnxruntime, CPU)",
        "",
    ]
    lines += [
        "## Files",
        "",
        "* `spec.json` -- the architecture (rayprune spec)",
        "* `weights.pt` -- a plain state_dict (no pickled module)",
        f"* `model.onnx` -- input `input` {tensor} preprocessed as above, output `logits`",
        "",
        "```python",
        "import json, torch",
        "from rayprune import models",
        "",
        'spec = json.load(open("spec.json"))',
        "model = models.build(spec)",
        'model.load_state_dict(torch.load("weights.pt", weights_only=True))',
        "model.eval()",
        "```",
        "",
    ]
    if info.get("registered_model"):
        lines += [
            "From the MLflow Model Registry (ONNX flavor, no pickled code):",
            "",
            "```python",
            "import mlflow",
            f'model = mlflow.pyfunc.load_model("models:/{info["registered_model"]}")',
            f'logits = model.predict(x)["logits"]   # x: float32 numpy array {tensor}',
            "```",
            "",
        ]
    return "\n".join(lines)
