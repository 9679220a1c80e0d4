"""The shared engine: datasets and device-resident loaders, the one training loop, evaluation,
robust accuracy, latency and checkpoints. Pure torch (no Ray, Optuna or MLflow).

Typical use::

    from rayprune.engine import load_dataset, fit, evaluate, TrainConfig
    train, test = load_dataset("digits")
    history = fit(net, train, TrainConfig(epochs=5, batch_size=64), device="cpu", seed=0)
    evaluate(net, test)  # {"top1": ..., "top5": ..., "loss": ...}
"""

from .checkpoint import atomic_save, capture_rng, load, restore_rng
from .data import (
    DataError,
    Dataset,
    FolderDataset,
    Loader,
    holdout_per_class,
    load_dataset,
    make_loader,
    split_per_class,
    synthetic_dataset,
)
from .imagefolder import ImageFolderSet, StreamingFolderSet, load_imagefolder
from .latency import measure_latency
from .robust import CORRUPTIONS, robust_accuracy
from .train import (
    TrainConfig,
    autocast,
    evaluate,
    fit,
    kd_loss,
    make_optimizer,
    make_scheduler,
    recalibrate_bn,
    recalibration_batches,
)
from .utils import bn_layers, resolve_device, seed_everything

__all__ = [
    "CORRUPTIONS",
    "DataError",
    "Dataset",
    "FolderDataset",
    "ImageFolderSet",
    "Loader",
    "StreamingFolderSet",
    "TrainConfig",
    "atomic_save",
    "autocast",
    "bn_layers",
    "capture_rng",
    "evaluate",
    "fit",
    "holdout_per_class",
    "kd_loss",
    "load",
    "load_dataset",
    "load_imagefolder",
    "make_loader",
    "make_optimizer",
    "make_scheduler",
    "measure_latency",
    "recalibrate_bn",
    "recalibration_batches",
    "resolve_device",
    "restore_rng",
    "robust_accuracy",
    "seed_everything",
    "split_per_class",
    "synthetic_dataset",
]
