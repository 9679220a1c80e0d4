"""A small, seconds-long run context: the tiny CIFAR ResNet on synthetic 16×16 data, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import models
from ..engine.data import synthetic_dataset
from ..engine.train import TrainConfig
from ..methods.base import Budget, RunContext
from ..models.base import Spec


def tiny_spec(shortcut: str = "avgpool_conv", num_classes: int = 4) -> Spec:
    """``cifar_resnet:tiny`` with 4 classes; ``avgpool_conv`` so weight-inheriting methods accept it."""
    return models.full_spec("cifar_resnet:tiny", num_classes=num_classes, shortcut=shortcut)


def tiny_context(
    workdir: str | Path,
    *,
    spec: Spec | None = None,
    budget: float = 0.5,
    max_stage_prune: list[float] | None = None,
    n_train: int = 160,
    n_test: int = 64,
    **fields: Any,
) -> RunContext:
    """A :class:`RunContext` over synthetic data (``n_train``/``n_test`` images of 16×16, seed 0)
    with a one-epoch fine-tune. ``fields`` override any other RunContext field (seed, teacher,
    kd_weight, finetune, ...)."""
    spec = spec or tiny_spec()
    train, test = synthetic_dataset(n_train=n_train, n_test=n_test, num_classes=spec["num_classes"], size=16, seed=0)
    fields = {
        "device": "cpu",
        "input_size": 16,
        "progress": False,
        "finetune": TrainConfig(epochs=1, batch_size=32, lr=0.05),
        **fields,
    }
    return RunContext(
        spec=spec,
        train=train,
        test=test,
        workdir=Path(workdir),
        budget=Budget(flops_target=budget, max_stage_prune=max_stage_prune),
        **fields,
    )
