"""Methods on a traced family (a user file with a concatenation and a grouped conv), and the
one-line refusals of networks, factories and methods the tracer cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayprune import models
from rayprune.engine.train import TrainConfig
from rayprune.grid import TargetWindow
from rayprune.methods import get_method
from rayprune.testing import tiny_context
from rayprune.testing.bad_input import refused

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "two_branch.py"
SIZE = 16

BAD = """
import torch
from torch import nn


def cbr(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Branchy(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.b, self.fc = cbr(3, 8), cbr(3, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.a(x) if x.mean() > 10 else self.b(x)
        return self.fc(y.mean((2, 3)))


class Normed(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.norm, self.fc = cbr(3, 8), nn.GroupNorm(2, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.a(x)).mean((2, 3)))


class Folded(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.b, self.fc = cbr(3, 8), cbr(4, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        return self.fc(self.b(y.view(n, 2, c // 2, h, w).sum(1)).mean((2, 3)))


class Mixed(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.fc = cbr(3, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.a(x).flatten(2)
        return self.fc((torch.softmax(y @ y.transpose(1, 2), -1) @ y).mean(2))


class CatStage(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.b, self.down, self.fc = cbr(3, 8), cbr(3, 8), cbr(16, 16), nn.Linear(16, num_classes)
        self.down[0].stride = (2, 2)

    def forward(self, x):
        return self.fc(self.down(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def branchy(num_classes=10):
    return Branchy(num_classes)


def cat_stage(num_classes=10):
    return CatStage(num_classes)


def normed(num_classes=10):
    return Normed(num_classes)


def folded(num_classes=10):
    return Folded(num_classes)


def mixed(num_classes=10):
    return Mixed(num_classes)


def not_a_module(num_classes=10):
    return 3
"""


@pytest.fixture(scope="module")
def spec():
    return models.full_spec(f"{EXAMPLE}:two_branch", num_classes=4, input_size=SIZE)


@pytest.mark.parametrize(
    "method,hparams",
    [
        ("l1", {"pretrain_epochs": 1, "bn_recal_batches": 1}),
        ("fpgm", {"pretrain_epochs": 1, "bn_recal_batches": 1}),
        ("random", None),
        ("uniform", None),
        ("ast", "smoke"),
    ],
)
def test_method_lands_in_its_window(tmp_path, spec, method, hparams):
    cls = get_method(method)
    ctx = tiny_context(tmp_path, spec=spec, budget=0.5, n_train=64, n_test=16, finetune=TrainConfig(epochs=1))
    run = cls(ctx, dict(cls.smoke) if hparams == "smoke" else hparams)
    run.run(max_steps=3)
    best = run.best()
    assert best.macs == models.macs(best.spec, SIZE)
    assert TargetWindow(ctx.budget.target_macs(spec, SIZE)).contains(best.macs), best.macs
    models.validate(best.spec)


@pytest.mark.parametrize(
    "method,model,needles",
    [  # a stage of cat_stage ends in a concatenation (two_branch's grouped conv is a group since issue 22)
        ("sp", "cat_stage", ("a stage would end in a concatenation", "no stage split", "use l1")),
        ("tas", "two_branch", ("super-net", "'traced'", "residual_net hook")),
    ],
)
def test_methods_without_the_hook_refuse_in_one_line(capsys, tmp_path, method, model, needles):
    out, file = tmp_path / "out", tmp_path / "bad_models.py"
    file.write_text(BAD)
    source = f"{EXAMPLE}:two_branch" if model == "two_branch" else f"{file}:{model}"
    argv = ["run", "--method", method, "--model", source, "--dataset", "digits"]
    refused(capsys, tmp_path, [*argv, "--flops-target", "0.5", "--smoke", "--out", str(out)], *needles)


@pytest.mark.parametrize(
    "factory,needles",
    [
        ("branchy", ("module 'a.0' is not called", "control flow")),
        ("normed", ("module 'norm' (GroupNorm)", "cannot prune")),
        ("folded", ("'b.0'", "reshape")),
        ("mixed", ("FlopCounterMode counts", "matmuls")),
        ("not_a_module", ("returned int",)),
        ("missing", ("defines no function 'missing'",)),
    ],
)
def test_networks_the_graph_cannot_handle_are_refused(capsys, tmp_path, factory, needles):
    file = tmp_path / "bad_models.py"
    file.write_text(BAD)
    argv = ["run", "--method", "l1", "--model", f"{file}:{factory}", "--dataset", "digits"]
    refused(capsys, tmp_path, [*argv, "--flops-target", "0.5", "--out", str(tmp_path / "out")], *needles)


def test_unknown_sources_are_refused(capsys, tmp_path):
    base = ["run", "--method", "l1", "--dataset", "digits", "--flops-target", "0.5", "--out", str(tmp_path / "o")]
    refused(capsys, tmp_path, [*base, "--model", "torchvision:resnet19"], "no such classification model", "resnet18")
    refused(capsys, tmp_path, [*base, "--model", str(tmp_path / "none.py:f")], "does not exist")
    refused(capsys, tmp_path, [*base, "--model", "no_such_pkg.models:f"], "cannot be imported")
    refused(capsys, tmp_path, [*base, "--model", "cifar_resnett:56"], "cifar_resnet")
