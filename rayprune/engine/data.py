"""Datasets, seeded per-class splits and the device-resident loader.

A :class:`Dataset` keeps its images as a uint8 ``[N, C, H, W]`` CPU tensor. :func:`make_loader`
copies them to the training device once (cached per dataset and device, so every training in
the process shares the copy) and does random crop, flip and normalisation batched on that
device, in ``channels_last`` (plain NCHW on the CPU: :func:`~rayprune.engine.utils.image_layout`).
There are no worker processes, and the same code runs on CPU and CUDA. Shuffling and
augmentation draw from a generator seeded by ``(seed, epoch)``, so an epoch is reproducible from
those two numbers alone; that is what makes resumed training exact.

Datasets (:data:`DATASETS`, a registry of :class:`DatasetInfo`; :func:`load_dataset` loads one):

* ``cifar10`` / ``cifar100``: the python-pickle releases (``cifar-10-batches-py``,
  ``cifar-100-python``), normalised with TAS's mean/std.
* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, offline), grey values 0..16
  scaled to 0..255 and repeated to 3 channels so every family's RGB stem works; a fixed
  stratified 80/20 train/test split (seed 0).
* ``imagefolder``: your own ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` at any class
  count (:mod:`rayprune.engine.imagefolder`).
* ``imagenet``: ImageFolder trees ``imagenet/train`` and ``imagenet/val`` (see
  :class:`FolderDataset`); decoded by DataLoader workers, normalised on the device.
* ``synthetic``: :func:`synthetic_dataset`, learnable class templates plus noise, for tests.

Data directory: the ``data_dir`` argument, else ``$RAYPRUNE_DATA_DIR``, else
``~/.cache/rayprune/data``. CIFAR is downloaded (torchvision) only when it is missing and the
download succeeds; otherwise :class:`DataError` says where it looked and how to fix it.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, RaypruneError
from ..registry import Registry
from .utils import as_image_batch, derive_seed, resolve_device

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "FolderDataset",
    "Loader",
    "default_data_dirs",
    "digits_dataset",
    "holdout_per_class",
    "load_cifar",
    "load_dataset",
    "make_loader",
    "random_crop_flip",
    "read_cifar_batch",
    "register_dataset",
    "sample_crop_flip",
    "split_per_class",
    "synthetic_dataset",
]

# TAS's reference code (AutoDL-Projects): pixel statistics on the 0..255 scale, divided by 255.
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class DataError(RaypruneError):
    """Data is missing or malformed. The message says where we looked and how to fix it."""


#: ``(data_dir, download, **options) -> (train, test)``; ``download`` is None (when missing) or False
#: (never); ``options`` are those the dataset's :attr:`DatasetInfo.options` names.
DatasetLoader = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset the engine loads by name, and what is known about it before loading it."""

    name: str
    load: DatasetLoader
    num_classes: int  # the usual number of classes (a folder dataset has those of its folder)
    input_size: int  # the images' side in pixels, the models' default input resolution
    from_folder: bool = False  # an ImageFolder tree: its classes are those of the folder
    downloads: bool = False  # fetched on first use when missing (so a sweep driver loads it once, up front)
    options: tuple[str, ...] = ()  # keyword settings its loader takes (e.g. imagefolder's input_size)
    check: Callable[[str | Path | None], Any] | None = None  # a cheap check of the data, before any work


#: Every dataset :func:`load_dataset` knows, by name (the CLI help and sweep files read it too).
DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset to :data:`DATASETS` under its name."""
    return DATASETS.add(info.name, info)


# --------------------------------------------------------------------------------------------
# In-memory dataset
# --------------------------------------------------------------------------------------------


class Dataset:
    """Images as a uint8 ``[N, C, H, W]`` CPU tensor plus int64 labels.

    Args:
        x: uint8 images ``[N, C, H, W]``.
        y: int64 labels ``[N]`` in ``[0, num_classes)``.
        num_classes: number of classes (may exceed the labels present in a subset).
        mean, std: per-channel normalisation in [0, 1] units.
        name: for messages and logs.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "dataset",
    ) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise DataError(f"{name}: images must be a uint8 [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise DataError(f"{name}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if len(mean) != x.shape[1] or len(std) != x.shape[1]:
            raise DataError(f"{name}: mean/std need {x.shape[1]} values (one per channel)")
        self.x = x.cpu()
        self.y = y.to(torch.int64).cpu()
        self.num_classes = int(num_classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self._device_copies: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, n={len(self)}, shape={tuple(self.x.shape[1:])}, classes={self.num_classes})"

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    @property
    def input_size(self) -> int:
        return self.x.shape[2]

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def crop_padding(self) -> int:
        """Random-crop padding: 4 px at 32 px (the CIFAR recipe), scaled with the image size."""
        return max(1, self.input_size // 8)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> Dataset:
        """A new dataset with the samples at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.mean, self.std, self.name)

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The images as uint8 ``[N, H, W, C]`` on ``device``, copied once and cached."""
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one copy
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self._device_copies:
            # NHWC so that a batch gather lands directly in channels_last order.
            self._device_copies[key] = self.x.permute(0, 2, 3, 1).contiguous().to(device)
        return self._device_copies[key]

    def __getstate__(self) -> dict[str, Any]:
        # Device copies are a cache: never pickle them (Ray ships datasets to workers).
        return {**self.__dict__, "_device_copies": {}}


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _class_indices(labels: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """For each class present, its sample indices in a seeded random order."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    gen = torch.Generator().manual_seed(seed)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        yield idx[torch.randperm(len(idx), generator=gen)]


def split_per_class(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices per class: ``round(fraction * n_c)`` of class ``c`` go to the first part.

    Used for TAS's 50/50 and AST's 80/20 search splits. Both parts are sorted index tensors.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    a, b = [], []
    for idx in _class_indices(labels, seed):
        k = round(fraction * len(idx))
        a.append(idx[:k])
        b.append(idx[k:])
    return torch.sort(torch.cat(a)).values, torch.sort(torch.cat(b)).values


def holdout_per_class(labels: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``per_class`` samples of every class (SP's proxy set): ``(idx_rest, idx_holdout)``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rest, held = [], []
    for idx in _class_indices(labels, seed):
        if len(idx) <= per_class:
            raise ValueError(f"cannot hold out {per_class} samples from a class with only {len(idx)}")
        held.append(idx[:per_class])
        rest.append(idx[per_class:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(held)).values


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def default_data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where data is looked for, in order: ``data_dir``, else ``$RAYPRUNE_DATA_DIR``, else the cache."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs = []
    if os.environ.get("RAYPRUNE_DATA_DIR"):
        dirs.append(Path(os.environ["RAYPRUNE_DATA_DIR"]).expanduser())
    dirs.append(Path.home() / ".cache" / "rayprune" / "data")
    return dirs


def _ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` for plain ndarrays only; the pickle's BUILD then sets the data."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return np.empty(0, dtype=np.uint8)


#: Plain numeric dtypes a CIFAR batch may use (never ``object``: its items would be unpickled objects).
_PLAIN_DTYPES = {f"{kind}{size}" for kind in "uif" for size in (1, 2, 4, 8)} | {"b1"}


def _plain_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if isinstance(spec, bytes):  # the release's py2 strings arrive as bytes (encoding="bytes")
        spec = spec.decode("ascii", "replace")
    if not isinstance(spec, str) or spec not in _PLAIN_DTYPES:
        raise pickle.UnpicklingError(f"dtype {spec!r} is not allowed")
    return np.dtype(spec)


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 writes ``bytes`` into a protocol-2 pickle (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError("only latin-1 encoded bytes are allowed")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Reads the CIFAR python-pickle release and nothing else: dicts, lists, strings, bytes,
    numbers and plain numeric numpy arrays. Any other global (``os.system``, a class, a function)
    is refused before it is looked up, so a crafted batch file cannot run code."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _unpickle(path: Path) -> Any:
    """A CIFAR batch file through :class:`_CifarUnpickler` (the release's py2 strings as bytes)."""
    # From memory, not the open file: a damaged file can make the C unpickler print CPython's
    # "deallocated bytearray object has exported buffers" on stderr while it fails.
    return _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()


def read_cifar_batch(path: Path, label_key: bytes = b"labels", num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch as ``(uint8 [N, 3, 32, 32], int64 [N])``, checked by shape, dtype and range.

    Raises:
        DataError: the file is truncated, not a pickle, holds anything but the release's plain
            data (it is refused without running any of it), or has the wrong shapes or labels.
    """
    fix = (
        f"delete the '{path.parent.name}' folder and download it again (or copy a fresh one from the official release)"
    )
    try:
        batch = _unpickle(path)
    except pickle.UnpicklingError as e:
        why = (
            str(e)
            if "not allowed" in str(e)
            else "it is truncated"
            if "truncated" in str(e)
            else "it is damaged or not a pickle"
        )
        raise DataError(f"{path} is not a CIFAR batch file ({why}); {fix}") from None
    except (EOFError, MemoryError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError):
        raise DataError(f"{path} is not a CIFAR batch file (it is truncated or damaged); {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(
            f"{path} is not a CIFAR batch file (expected a dict with keys {b'data'!r} and {label_key!r}); {fix}"
        )
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], got {shape}; {fix}")
    if not (
        isinstance(labels, (list, np.ndarray))
        and len(labels) == len(data)
        and all(isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels)
    ):
        raise DataError(f"{path}: {label_key.decode()!r} must be {len(data)} integer labels (one per image); {fix}")
    y = np.asarray(labels, dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels must be in [0, {num_classes}), got {int(y.min())}..{int(y.max())}; {fix}")
    return data.reshape(-1, 3, 32, 32), y


def _read_cifar_batches(
    folder: Path, files: Sequence[str], label_key: bytes, num_classes: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder} is incomplete: {name} is missing; delete the folder and download again")
        x, y = read_cifar_batch(path, label_key, num_classes)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(folder: str | Path, name: str = "cifar10") -> tuple[Dataset, Dataset]:
    """Read an extracted CIFAR-10/100 python-pickle folder into ``(train, test)``."""
    folder = Path(folder)
    if name == "cifar10":
        train_files, test_files, key, classes = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif name == "cifar100":
        train_files, test_files, key, classes = ["train"], ["test"], b"fine_labels", 100
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        raise ValueError(f"not a CIFAR dataset: {name!r}")
    train = Dataset(*_read_cifar_batches(folder, train_files, key, classes), classes, mean, std, name)
    test = Dataset(*_read_cifar_batches(folder, test_files, key, classes), classes, mean, std, name)
    return train, test


def _download_cifar(name: str, root: Path) -> None:
    """Download and extract with torchvision (raises on any network failure).

    Works in a scratch folder and moves only the finished dataset folder into ``root``, so a
    failed or interrupted download leaves nothing behind (not even a new ``root``).
    """
    import shutil
    import tempfile

    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".rayprune-download-", dir=root))
    try:
        for train in (True, False):
            cls(str(scratch), train=train, download=True)
        (scratch / _CIFAR_FOLDERS[name]).rename(root / _CIFAR_FOLDERS[name])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()


def _find_cifar(name: str, data_dir: str | Path | None, download: bool | None) -> Path:
    folder = _CIFAR_FOLDERS[name]
    candidates = default_data_dirs(data_dir)
    for root in candidates:
        if (root / folder).is_dir():
            return root / folder
    failure = "download=False"
    if download is not False:
        try:
            _download_cifar(name, candidates[0])
            return candidates[0] / folder
        except Exception as e:  # offline, proxy, disk: all mean "not available"; say why below
            failure = f"download failed: {type(e).__name__}: {e}"
    looked = ", ".join(str(root / folder) for root in candidates)
    raise DataError(
        f"{name} not found (looked in {looked}; {failure}). Put the extracted '{folder}' folder in a "
        f"directory, or run once with network access to download it into {candidates[0]}",
        fix="give that directory as data_dir or in RAYPRUNE_DATA_DIR",
        hint="data_dir",
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(images [1797, 8, 8] of 0..16, labels)``, read straight
    from the CSV scikit-learn bundles (``load_digits`` reads the same file): importing
    ``sklearn.datasets`` loads SciPy and pandas, about two CPU seconds in every process (each
    Ray worker of a digits sweep). Falls back to ``load_digits`` if the file moved."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    bundled = [Path(root) / "datasets" / "data" / "digits.csv.gz" for root in roots]
    if bundled and bundled[0].is_file():
        with gzip.open(bundled[0], "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def digits_dataset(seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits, 3 channels, fixed stratified 80/20 split (offline)."""
    images, labels = digits_arrays()
    grey = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    x = torch.from_numpy(grey)[:, None].repeat(1, 3, 1, 1)  # RGB stems everywhere: repeat the channel
    y = torch.from_numpy(labels)
    train_idx, test_idx = split_per_class(y, 0.8, seed)
    mean = (x[train_idx].float().mean() / 255).item()
    std = (x[train_idx].float().std() / 255).item()
    full = Dataset(x, y, 10, (mean,) * 3, (std,) * 3, "digits")
    return full.subset(train_idx), full.subset(test_idx)


def synthetic_dataset(
    n_train: int = 256, n_test: int = 128, num_classes: int = 10, size: int = 32, channels: int = 3, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """A learnable toy dataset: per-class smooth templates plus pixel noise.

    Templates are flip-symmetric and low-frequency, so the crop/flip augmentation keeps the
    class evident and a tiny network learns it in a few epochs.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    coarse = (coarse + coarse.flip(-1)) / 2
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        noise = 0.12 * torch.randn(n, channels, size, size, generator=gen)
        x = ((templates[y] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return x, y

    mean, std = (0.5,) * channels, (0.25,) * channels
    train = Dataset(*sample(n_train), num_classes, mean, std, "synthetic")
    test = Dataset(*sample(n_test), num_classes, mean, std, "synthetic")
    return train, test


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool | None = None,
    input_size: int | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """``(train, test)`` for one of :data:`DATASETS`.

    Args:
        name: a registered dataset: ``cifar10``, ``cifar100``, ``digits``, ``imagefolder``, ``imagenet``, ...
        data_dir: where the data lives (default ``$RAYPRUNE_DATA_DIR``, then ``~/.cache/rayprune/data``).
        download: CIFAR only. ``None`` tries to download when missing, ``False`` never does.
        input_size: the side the images are prepared at, for a dataset that takes it (imagefolder,
            synthetic); the others keep their own size.
        options: the dataset's own settings (:attr:`DatasetInfo.options`).

    Raises:
        DataError: the data is missing and cannot be downloaded (the message says how to fix it).
        InputError: unknown dataset name, or options the dataset does not take.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS.get(name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        own = [k for k in info.options if k != "input_size"]
        fix = f"use one of {', '.join(own)}" if own else "drop it (only imagefolder takes options)"
        raise InputError(f"dataset {name!r} has no option {', '.join(unknown)}; {fix}")
    if "input_size" in info.options and input_size is not None:
        options["input_size"] = input_size
    return info.load(data_dir, download, **options)


# --------------------------------------------------------------------------------------------
# Device-resident loader
# --------------------------------------------------------------------------------------------


def sample_crop_flip(n: int, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample augmentation parameters ``[n, 3]`` = (row shift, column shift, flip) on the CPU."""
    shifts = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen)
    flips = (torch.rand(n, 1, generator=gen) < 0.5).long()
    return torch.cat([shifts, flips], dim=1)


def random_crop_flip(images: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop (zero padding, like torchvision's ``RandomCrop(padding=p)``) and horizontal flip.

    Args:
        images: a batch ``[B, H, W, C]`` (any dtype) on any device.
        params: ``[B, 3]`` from :func:`sample_crop_flip`, on the same device as ``images``.
        padding: pixels of zero padding on each side before cropping back to ``H x W``.

    Returns:
        ``[B, H, W, C]``: image ``i`` is the ``H x W`` window at (row, column) shift ``params[i, :2]``
        of the padded image, mirrored left-right when ``params[i, 2]`` is 1.
    """
    b, h, w, _ = images.shape
    dy, dx, flip = params[:, 0:1], params[:, 1:2], params[:, 2:3].bool()
    cols = torch.arange(w, device=images.device)
    cols = dx + torch.where(flip, w - 1 - cols, cols)  # a flip reverses the crop window's columns
    rows = dy + torch.arange(h, device=images.device)
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # pads W then H of [B, H, W, C]
    batch = torch.arange(b, device=images.device)
    return padded[batch[:, None, None], rows[:, :, None], cols[:, None, :]]


class Loader:
    """Iterates ``(x, y)`` batches on the device: x float32 normalised ``[B, C, H, W]`` in
    ``channels_last``, y int64. Built by :func:`make_loader`.

    ``train=True`` shuffles and augments with randomness seeded by ``(seed, epoch)``; call
    :meth:`set_epoch` before each epoch. ``normalize=False`` yields images in [0, 1] instead
    (for corruptions); :meth:`normalize` applies the dataset's normalisation afterwards.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        train: bool,
        device: torch.device,
        seed: int,
        drop_last: bool,
        normalize: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.device, self.seed, self.drop_last, self.normalized = device, seed, drop_last, normalize
        self.epoch = 0
        shape = (1, dataset.channels, 1, 1)
        self._mean = torch.tensor(dataset.mean, device=device).view(shape)
        self._std = torch.tensor(dataset.std, device=device).view(shape)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> normalised network inputs (keeps the memory format)."""
        return (x01 - self._mean) / self._std

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = self.dataset.on_device(self.device)
        labels = self.dataset.y.to(self.device)
        n = len(self.dataset)
        if self.train:
            # All of the epoch's randomness in one host->device copy: a copy per batch would
            # synchronise the host with the GPU every step.
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
            params = sample_crop_flip(n, self.dataset.crop_padding, gen)
            order, params = order.to(self.device), params.to(self.device)
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min(n, (i + 1) * self.batch_size)
            if not self.train:
                yield self._to_input(images[lo:hi]), labels[lo:hi]
                continue
            idx = order[lo:hi]
            batch = random_crop_flip(images[idx], params[lo:hi], self.dataset.crop_padding)
            yield self._to_input(batch), labels[idx]

    def _to_input(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        # permute of an NHWC-contiguous tensor *is* an NCHW tensor in channels_last layout (kept
        # on accelerators; copied to plain NCHW on the CPU, see image_layout).
        x = as_image_batch(batch_nhwc.permute(0, 3, 1, 2)).float().div_(255.0)
        return self.normalize(x) if self.normalized else x


def make_loader(
    ds: Any,
    batch_size: int,
    *,
    train: bool,
    device: str | torch.device = "cpu",
    seed: int = 0,
    drop_last: bool | None = None,
    normalize: bool = True,
) -> Any:
    """A loader over ``ds`` that yields normalised ``channels_last`` batches on ``device``.

    Args:
        ds: a :class:`Dataset` (device-resident loader) or :class:`FolderDataset` (worker loader).
        batch_size: samples per batch.
        train: shuffle and augment (random crop + flip) when True; fixed order otherwise.
        device: where the batches live.
        seed: shuffling/augmentation seed; combined with the epoch set by ``set_epoch``.
        drop_last: drop the last partial batch. Default: when training and at least one full batch
            exists (a trailing batch of one sample would break BatchNorm).
        normalize: False yields [0, 1] images (apply ``loader.normalize`` later).
    """
    device = resolve_device(device)
    if drop_last is None:
        drop_last = train and len(ds) >= batch_size
    if hasattr(ds, "make_loader"):  # a dataset that brings its own loader (imagefolder's)
        return ds.make_loader(
            batch_size, train=train, device=device, seed=seed, drop_last=drop_last, normalize=normalize
        )
    if isinstance(ds, FolderDataset):
        return FolderLoader(
            ds,  # type: ignore[arg-type]  # it has all that Loader.__init__ reads: channels, mean, std, len
            batch_size,
            train=train,
            device=device,
            seed=seed,
            drop_last=drop_last,
            normalize=normalize,
        )
    if not isinstance(ds, Dataset):
        raise TypeError(f"make_loader needs an engine Dataset or FolderDataset, got {type(ds).__name__}")
    return Loader(ds, batch_size, train=train, device=device, seed=seed, drop_last=drop_last, normalize=normalize)


# --------------------------------------------------------------------------------------------
# Image folders (ImageNet)
# --------------------------------------------------------------------------------------------


class FolderDataset:
    """An ImageFolder tree (``root/<class>/<image>``) with the :class:`Dataset` attributes.

    Images are decoded lazily by DataLoader workers: train uses RandomResizedCrop + flip, eval
    resizes to ``input_size * 8/7`` (256 for 224) and centre-crops. ``x`` is not available.
    ``workers``: DataLoader worker processes (default ``min(8, cpus)``; 0 decodes in-process).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        train: bool,
        input_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        name: str = "imagenet",
        indices: torch.Tensor | None = None,
        workers: int | None = None,
    ) -> None:
        from torchvision.datasets import ImageFolder

        self.root, self.train, self.input_size, self.name = Path(root), train, input_size, name
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.mean, self.std, self.channels = tuple(mean), tuple(std), 3
        self.folder = ImageFolder(str(self.root), transform=self._transform())
        self.num_classes = len(self.folder.classes)
        all_labels = torch.as_tensor(self.folder.targets, dtype=torch.int64)
        self.indices = torch.arange(len(all_labels)) if indices is None else torch.as_tensor(indices)
        self.y = all_labels[self.indices]

    def _transform(self) -> Any:
        from torchvision import transforms as T

        if self.train:
            return T.Compose([T.RandomResizedCrop(self.input_size), T.RandomHorizontalFlip(), T.PILToTensor()])
        resize = round(self.input_size * 256 / 224)
        return T.Compose([T.Resize(resize), T.CenterCrop(self.input_size), T.PILToTensor()])

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> FolderDataset:
        """The images at positions ``indices`` of this dataset. The scanned folder is shared rather
        than scanned again (ImageNet's train folder holds 1.28M images)."""
        picked = torch.as_tensor(indices, dtype=torch.int64)
        part = copy.copy(self)
        part.indices, part.y = self.indices[picked], self.y[picked]
        return part

    def torch_dataset(self) -> torch.utils.data.Dataset:
        return torch.utils.data.Subset(self.folder, self.indices.tolist())


class FolderLoader(Loader):
    """Worker-based loader for :class:`FolderDataset` with the :class:`Loader` interface."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        dataset = cast(FolderDataset, self.dataset)  # make_loader gives a FolderLoader a FolderDataset only
        workers = dataset.workers
        loader = torch.utils.data.DataLoader(
            dataset.torch_dataset(),
            batch_size=self.batch_size,
            shuffle=self.train,
            drop_last=self.drop_last,
            generator=gen,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for images, y in loader:  # uint8 [B, C, H, W]
            x = as_image_batch(images.to(self.device, non_blocking=True))
            x = x.float().div_(255.0)
            yield (self.normalize(x) if self.normalized else x), y.to(self.device, non_blocking=True)


def _load_imagenet(data_dir: str | Path | None) -> tuple[FolderDataset, FolderDataset]:
    candidates = default_data_dirs(data_dir)
    for root in candidates:
        if (root / "imagenet" / "train").is_dir() and (root / "imagenet" / "val").is_dir():
            return (
                FolderDataset(root / "imagenet" / "train", train=True),
                FolderDataset(root / "imagenet" / "val", train=False),
            )
    looked = ", ".join(str(r / "imagenet") for r in candidates)
    raise DataError(
        f"imagenet not found (looked in {looked}). Provide ImageFolder trees imagenet/train and "
        f"imagenet/val under a directory",
        fix="give that directory as data_dir or in RAYPRUNE_DATA_DIR",
        hint="data_dir",
    )


# --------------------------------------------------------------------------------------------
# The built-in datasets
# --------------------------------------------------------------------------------------------


def _load_cifar10(data_dir: str | Path | None, download: bool | None) -> tuple[Dataset, Dataset]:
    return load_cifar(_find_cifar("cifar10", data_dir, download), "cifar10")


def _load_cifar100(data_dir: str | Path | None, download: bool | None) -> tuple[Dataset, Dataset]:
    return load_cifar(_find_cifar("cifar100", data_dir, download), "cifar100")


def _load_digits(data_dir: str | Path | None, download: bool | None) -> tuple[Dataset, Dataset]:
    return digits_dataset()  # bundled with scikit-learn: no folder, no download


def _load_imagenet_folders(data_dir: str | Path | None, download: bool | None) -> tuple[FolderDataset, FolderDataset]:
    return _load_imagenet(data_dir)  # never downloaded: the folders are the user's


def _load_synthetic(
    data_dir: str | Path | None, download: bool | None, input_size: int = 32
) -> tuple[Dataset, Dataset]:
    return synthetic_dataset(size=input_size)  # made at the size the sweep trains at


register_dataset(DatasetInfo("cifar10", _load_cifar10, num_classes=10, input_size=32, downloads=True))
register_dataset(DatasetInfo("cifar100", _load_cifar100, num_classes=100, input_size=32, downloads=True))
register_dataset(DatasetInfo("digits", _load_digits, num_classes=10, input_size=8))
register_dataset(DatasetInfo("imagenet", _load_imagenet_folders, num_classes=1000, input_size=224, from_folder=True))
register_dataset(DatasetInfo("synthetic", _load_synthetic, num_classes=10, input_size=32, options=("input_size",)))
