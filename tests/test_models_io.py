"""models.subnet_io: the one saved-subnet format (spec.json, weights.pt, metrics.json with the input size)."""

from __future__ import annotations

import json

import pytest
import torch

from rayprune import models
from rayprune.engine.checkpoint import UnreadableFileError
from rayprune.methods import SubnetRecord
from rayprune.models import subnet_io
from rayprune.runner import load_subnet, load_teacher


def test_round_trip_keeps_spec_weights_record_and_input_size(tmp_path, tiny_spec):
    net = models.build(tiny_spec, seed=3)
    record = SubnetRecord.of(tiny_spec, {"test_top1": 0.5}, "uniform", 2, 24).to_dict()
    out = subnet_io.save(tmp_path / "sub", tiny_spec, net.state_dict(), record, input_size=24)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "spec.json", "weights.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging debris
    saved = subnet_io.load(out)
    assert saved.spec == tiny_spec and saved.input_size == 24 and saved.require_input_size() == 24
    assert saved.record == record and saved.metrics == {"test_top1": 0.5}
    x = torch.randn(2, 3, 24, 24)
    assert torch.equal(saved.build().eval()(x), net.eval()(x))
    spec, rebuilt = load_subnet(out)
    assert spec == tiny_spec and torch.equal(rebuilt.eval()(x), net(x))
    assert not load_teacher(out, tiny_spec, "cpu").training


def test_old_folders_fall_back_to_the_callers_size_then_the_spec_hint(tmp_path, tiny_spec):
    old = subnet_io.save(
        tmp_path / "old", tiny_spec, models.build(tiny_spec).state_dict(), {"test_top1": 0.7, "macs": 1234}
    )  # an old teacher's flat metrics.json
    saved = subnet_io.load(old)
    assert saved.input_size is None and saved.metrics == {"test_top1": 0.7, "macs": 1234}
    with pytest.raises(models.SpecError, match="records no input size"):
        saved.require_input_size()
    assert subnet_io.load(old, default_input_size=32).input_size == 32
    hinted = models.full_spec("mobilenet_v2:tiny", num_classes=4)
    assert hinted["input_size"] == 32
    bare = subnet_io.save(tmp_path / "bare", hinted, models.build(hinted).state_dict())
    assert not (bare / "metrics.json").exists() and subnet_io.load(bare).input_size == 32
    # a run trains at its own or its dataset's size, never at the hint: the caller's size wins
    assert subnet_io.load(bare, default_input_size=8).input_size == 8
    sized = subnet_io.save(tmp_path / "sized", hinted, models.build(hinted).state_dict(), input_size=16)
    assert subnet_io.load(sized, default_input_size=8).input_size == 16  # the saved size beats both


def test_missing_files_are_named(tmp_path, tiny_spec):
    out = subnet_io.save(tmp_path / "s", tiny_spec, models.build(tiny_spec).state_dict())
    assert subnet_io.is_saved(out)
    (out / "weights.pt").unlink()
    assert not subnet_io.is_saved(out)
    with pytest.raises(subnet_io.NotASubnetError, match=r"lacks weights.pt"):
        subnet_io.load(out)
    with pytest.raises(FileNotFoundError):
        load_subnet(out)


def test_weights_are_never_unpickled(tmp_path, tiny_spec):
    out = subnet_io.save(tmp_path / "s", tiny_spec, models.build(tiny_spec).state_dict())
    torch.save({"net": models.build(tiny_spec)}, out / "weights.pt")  # a pickled module
    with pytest.raises(UnreadableFileError, match=r"weights.pt': it holds pickled Python objects") as err:
        subnet_io.load(out)
    assert "weights_only" not in str(err.value)  # never the advice to load it unsafely
    assert json.loads((out / "spec.json").read_text()) == tiny_spec
