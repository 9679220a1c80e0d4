"""export_subnet: spec + state_dict + ONNX (checked with onnxruntime) + model card, all or nothing."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rayprune import models
from rayprune.export import ExportError, export_subnet

PRUNED = models.with_widths(models.full_spec("cifar_resnet:tiny"), {"stem": 6, "s1.b0.mid": 5, "s2.b1.mid": 20})


def trained_like_state(spec, seed=0):
    torch.manual_seed(seed)
    net = models.build(spec)
    for m in net.modules():  # non-trivial BN statistics, so eval-mode BN folding is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.state_dict()


def onnx_vs_torch(out_dir, batch=4, size=32):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    net = models.build(json.loads((out_dir / "spec.json").read_text()))
    net.load_state_dict(torch.load(out_dir / "weights.pt", weights_only=True))
    with torch.no_grad():
        want = net.eval()(x).numpy()
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    return got, want


@pytest.mark.slow
def test_default_export_writes_all_files_and_onnx_matches_torch(tmp_path):
    state = trained_like_state(PRUNED)
    out = export_subnet(
        PRUNED,
        state,
        {"test_top1": 0.875, "robust_top1": 0.5},
        tmp_path / "efficient",
        input_size=32,
        info={"mode": "efficient", "sweep_id": "sw1", "source_run_id": "abc"},
    )
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model_card.md", "spec.json", "weights.pt"]
    assert json.loads((out / "spec.json").read_text()) == PRUNED
    loaded = torch.load(out / "weights.pt", weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    got, want = onnx_vs_torch(out)
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    card = (out / "model_card.md").read_text()
    assert f"| MACs | {models.macs(PRUNED):,} |" in card
    assert "| test_top1 | 0.8750 |" in card and "| s1.b0.mid | 5 |" in card
    assert "* sweep_id: `sw1`" in card and "* source_run_id: `abc`" in card
    assert f"spec hash: `{models.spec_hash(PRUNED)}`" in card and "ONNX exporter: dynamo" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficient"]  # no staging dir left


def test_auto_falls_back_to_the_legacy_exporter_when_dynamo_fails(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_breaks(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("untraceable graph")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    out = export_subnet(PRUNED, trained_like_state(PRUNED, 1), {}, tmp_path / "e", input_size=16)
    got, want = onnx_vs_torch(out, batch=2, size=16)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert "ONNX exporter: torchscript" in (out / "model_card.md").read_text()
    assert "input 3x16x16" in (out / "model_card.md").read_text()


def test_failed_export_leaves_nothing_and_existing_output_is_never_touched(tmp_path):
    wrong = trained_like_state(models.full_spec("cifar_resnet:tiny"))  # weights of the unpruned net
    with pytest.raises(ExportError, match="weights do not match the spec"):
        export_subnet(PRUNED, wrong, {}, tmp_path / "out", input_size=32)
    assert list(tmp_path.iterdir()) == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty; give a new output directory"):
        export_subnet(PRUNED, trained_like_state(PRUNED), {}, busy, input_size=32)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_export_takes_the_size_the_subnet_was_trained_at_not_the_family_default(tmp_path):
    preprocessing = {"input_size": 8, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    out = export_subnet(
        PRUNED,
        trained_like_state(PRUNED),
        {},
        tmp_path / "e",
        input_size=8,
        exporter="torchscript",
        preprocessing=preprocessing,
    )
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 8, 8]
    got, want = onnx_vs_torch(out, batch=5, size=8)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    card = (out / "model_card.md").read_text()
    assert "* family: `cifar_resnet`, input 3x8x8, 10 classes" in card
    assert "* input: float32 tensor [batch, 3, 8, 8], layout NCHW" in card
    assert f"| MACs | {models.macs(PRUNED, 8):,} |" in card and "x32" not in card
    with pytest.raises(ExportError, match="cannot export at input size 0: input_size must be an integer >= 1"):
        export_subnet(PRUNED, trained_like_state(PRUNED), {}, tmp_path / "zero", input_size=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
