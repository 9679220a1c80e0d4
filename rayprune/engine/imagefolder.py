"""Your own images: the ``imagefolder`` dataset.

A folder ``DIR`` holds ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``, and optionally
``DIR/test/<class>/*``. The classes are the folder names (sorted; the label of a class is its
position), ``num_classes`` their count. The evaluation split is ``test/`` when it exists, else
``val/`` (the methods carve their search-validation split out of ``train/``, so ``val/`` is only
checked when ``test/`` is there). Files in class folders may sit in sub-folders; names starting
with a dot are skipped. Grayscale, palette and RGBA images are converted to RGB (alpha dropped).

Every image is decoded once to a square of :func:`stored_side` pixels (``~1.15x`` the input
size: the shorter side resized to it, bilinear, then the centre square). Training crops a random
area (8 % to 100 %, aspect 3/4 to 4/3, torchvision's RandomResizedCrop draw) of that square,
resizes it to the input size (bilinear) and flips half of the images; evaluation takes the centre
``input_size`` square. The crops and flips are drawn from ``(seed, epoch)`` and applied batched on
the training device, so the two ways of feeding the images give the same batches:

* ``memory``: a set whose decoded size (all splits, uint8) is at most ``memory_limit_gb`` is
  decoded once, cached as a uint8 tensor file under ``cache_dir`` and kept on the training device
  like CIFAR (:class:`ImageFolderSet`).
* ``stream``: a larger set is decoded every epoch by DataLoader workers (:class:`StreamingFolderSet`).

Each set's ``loading`` says which ran; the fine-tuned record carries it (``source.data_loading``).
The channel mean and std are computed once on the decoded training split and cached beside it,
unless given. Bad data (a missing ``train/``, an empty class folder, classes that differ between
the splits, a file that is not an image, fewer than 2 classes) is one :class:`DataError` line,
raised before anything is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import validated
from .checkpoint import atomic_save, safe_load
from .data import DataError, Dataset, DatasetInfo, Loader, register_dataset
from .utils import as_image_batch, derive_seed

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_MEMORY_LIMIT_GB",
    "FolderTree",
    "ImageFolderLoader",
    "ImageFolderOptions",
    "ImageFolderSet",
    "StreamingFolderSet",
    "load_imagefolder",
    "resized_crop_flip",
    "sample_resized_crops",
    "scan_tree",
    "stored_side",
]

DEFAULT_INPUT_SIZE = 224
DEFAULT_MEMORY_LIMIT_GB = 2.0
#: The decoded side over the input side: 256 for 224, the usual resize-then-centre-crop ratio.
STORED_RATIO = 256 / 224
#: torchvision's RandomResizedCrop defaults: the crop's share of the area and its aspect ratio.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_CACHE_VERSION = 1
_DECODE_BATCH = 64


class ImageFolderOptions(BaseModel):
    """The imagefolder dataset's settings (None: the default). Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_limit_gb: float | None = Field(default=None, ge=0.0)  # decoded size up to which the set stays in memory
    mean: tuple[float, float, float] | None = None  # per channel, in [0, 1] units; None: computed on train
    std: tuple[float, float, float] | None = None
    workers: int | None = Field(default=None, ge=0)  # DataLoader decode processes; 0: in-process
    cache_dir: str | None = None  # where decoded images and statistics are cached (default ./.rayprune-cache)


def stored_side(input_size: int) -> int:
    """The side images are decoded to for an ``input_size`` network input (~1.15x, 256 for 224)."""
    return max(input_size, round(input_size * STORED_RATIO))


# --------------------------------------------------------------------------------------------
# Scanning and checking the tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderTree:
    """A checked ImageFolder tree: its classes and, per split, the image files and their labels."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[Path]]  # split name -> image files, sorted by class then path
    labels: dict[str, list[int]]

    @property
    def eval_split(self) -> str:
        """``test`` when the tree has one, else ``val``."""
        return "test" if "test" in self.files else "val"


def scan_tree(data_dir: str | Path | None) -> FolderTree:
    """Check the tree at ``data_dir`` and list its images (headers are read, nothing is decoded).

    Raises:
        DataError: no folder, no ``train/`` or ``val/``, fewer than 2 classes, an empty class
            folder, class folders that differ between splits, or a file that is not an image.
    """
    if data_dir is None:
        raise DataError("the imagefolder dataset needs data_dir: the folder that holds train/<class>/ and val/<class>/")
    root = Path(data_dir).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a folder; give the folder that holds train/ and val/")
    splits = ["train", "val"] + (["test"] if (root / "test").is_dir() else [])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"imagefolder: {root} has no {split}/ folder; put the images in {root}/{split}/<class>/ "
                "(one folder per class)"
            )
    classes = {split: _class_folders(root / split) for split in splits}
    train_classes = classes["train"]
    if len(train_classes) < 2:
        found = f" ({', '.join(train_classes)})" if train_classes else ""
        raise DataError(
            f"imagefolder: {root}/train has {len(train_classes)} class folder{'' if len(train_classes) == 1 else 's'}"
            f"{found}; a classifier needs at least 2: add a folder of images per class"
        )
    for split in splits[1:]:
        _check_same_classes(root, train_classes, split, classes[split])
    files: dict[str, list[Path]] = {}
    labels: dict[str, list[int]] = {}
    for split in splits:
        files[split], labels[split] = [], []
        for label, name in enumerate(train_classes):
            images = _class_images(root / split / name)
            files[split] += images
            labels[split] += [label] * len(images)
    return FolderTree(root, tuple(train_classes), files, labels)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(split_dir: Path) -> list[str]:
    entries = sorted(p for p in split_dir.iterdir() if _visible(p.name))
    for p in entries:
        if not p.is_dir():
            raise DataError(
                f"imagefolder: {p} is a file beside the class folders; move it into a class folder or out of the tree"
            )
    return [p.name for p in entries]


def _check_same_classes(root: Path, train: list[str], split: str, other: list[str]) -> None:
    if other == train:
        return
    only_train, only_other = sorted(set(train) - set(other)), sorted(set(other) - set(train))
    parts = [f"only in train/: {', '.join(only_train)}" if only_train else "", ""]
    parts[1] = f"only in {split}/: {', '.join(only_other)}" if only_other else ""
    raise DataError(
        f"imagefolder: the classes of {root}/train and {root}/{split} differ ({'; '.join(p for p in parts if p)}); "
        "give every split the same class folders"
    )


def _class_images(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and all(_visible(q) for q in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"imagefolder: the class folder {folder} holds no images; add images or remove the class")
    for path in files:
        _check_image(path)
    return files


def _check_image(path: Path) -> None:
    """``path`` opens as an image (its header; the pixels are decoded later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  # the header is read on open; touching the size proves it parsed
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DataError(f"imagefolder: {path} is not an image (Pillow cannot read it); remove it") from None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode(path: Path, side: int) -> np.ndarray:
    """``path`` as RGB uint8 ``[side, side, 3]``: shorter side resized to ``side``, centre square."""
    from PIL import Image, ImageOps

    with Image.open(path) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about palettes with transparency while converting
        rgb = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA", "LA") else im.convert("RGB")
        square = ImageOps.fit(rgb, (side, side), method=Image.Resampling.BILINEAR)
        return np.asarray(square, dtype=np.uint8).copy()


class _DecodeSet(torch.utils.data.Dataset[tuple[torch.Tensor, int, str]]):
    """Decodes in DataLoader workers. A file that fails comes back as its error text, so the
    main process raises one clean line (a worker's exception arrives wrapped in its traceback)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], side: int) -> None:
        self.files, self.labels, self.side = list(files), list(labels), side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return torch.from_numpy(decode(self.files[i], self.side)), self.labels[i], ""
        except Exception as e:  # a damaged file: reported by the main process, naming it
            return torch.zeros(self.side, self.side, 3, dtype=torch.uint8), self.labels[i], f"{self.files[i]}: {e}"


def _decoded_batches(
    files: Sequence[Path],
    labels: Sequence[int],
    side: int,
    workers: int,
    order: Sequence[int] | None = None,
    batch_size: int = _DECODE_BATCH,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 ``[B, side, side, 3]`` batches and their labels, in ``order`` (default: file order)."""
    loader = torch.utils.data.DataLoader(
        _DecodeSet(files, labels, side),
        batch_size=batch_size,
        sampler=list(range(len(files))) if order is None else list(order),
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
    )
    for images, y, errors in loader:
        failed = [e for e in errors if e]
        if failed:
            raise DataError(f"imagefolder: cannot decode {failed[0]}; remove or replace that file")
        yield images, y


def _decode_all(files: Sequence[Path], labels: Sequence[int], side: int, workers: int) -> torch.Tensor:
    """Every image of ``files`` as one uint8 ``[N, 3, side, side]`` tensor."""
    x = torch.empty(len(files), 3, side, side, dtype=torch.uint8)
    start = 0
    for images, _ in _decoded_batches(files, labels, side, workers):
        x[start : start + len(images)] = images.permute(0, 3, 1, 2)
        start += len(images)
    return x


# --------------------------------------------------------------------------------------------
# Augmentation (both ways of feeding share it)
# --------------------------------------------------------------------------------------------


def sample_resized_crops(n: int, side: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image crop boxes and flips ``[n, 5]`` = (top, left, height, width, flip) in a
    ``side x side`` image, drawn like torchvision's RandomResizedCrop (ten tries, else the whole image)."""
    area = side * side
    scale = torch.empty(n, _CROP_ATTEMPTS).uniform_(*CROP_SCALE, generator=gen)
    log_ratio = torch.empty(n, _CROP_ATTEMPTS).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=gen)
    ratio = log_ratio.exp()
    w = (area * scale * ratio).sqrt().round()
    h = (area * scale / ratio).sqrt().round()
    fits = (w >= 1) & (w <= side) & (h >= 1) & (h <= side)
    first = fits.float().argmax(dim=1)  # the first try that fits (argmax of an all-False row is 0)
    rows = torch.arange(n)
    h = torch.where(fits.any(dim=1), h[rows, first], torch.full((n,), float(side)))
    w = torch.where(fits.any(dim=1), w[rows, first], torch.full((n,), float(side)))
    top = (torch.rand(n, generator=gen) * (side - h + 1)).floor()
    left = (torch.rand(n, generator=gen) * (side - w + 1)).floor()
    flip = (torch.rand(n, generator=gen) < 0.5).float()
    return torch.stack([top, left, h, w, flip], dim=1)


def resized_crop_flip(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of a uint8 ``[B, S, S, C]`` batch to its box, resize it to ``size``
    (bilinear) and mirror it when its flip is set; returns float ``[B, C, size, size]`` in 0..255.

    ``params`` (from :func:`sample_resized_crops`) is on the batch's device."""
    b, s = images.shape[0], images.shape[1]
    x = images.permute(0, 3, 1, 2).float()
    top, left, h, w, flip = params.float().unbind(dim=1)
    mirror = 1.0 - 2.0 * flip
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = w / s * mirror  # output x in [-1, 1] -> the box's columns, reversed when flipped
    theta[:, 0, 2] = (2 * left + w) / s - 1
    theta[:, 1, 1] = h / s
    theta[:, 1, 2] = (2 * top + h) / s - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` square of a uint8 ``[B, S, S, C]`` batch, as float ``[B, C, size, size]``."""
    off = (images.shape[1] - size) // 2
    return images[:, off : off + size, off : off + size, :].permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------------------------
# The two sets and their loader
# --------------------------------------------------------------------------------------------


class ImageFolderSet(Dataset):
    """An imagefolder split held in memory: uint8 ``[N, 3, S, S]`` images decoded at
    :func:`stored_side`, fed to ``input_size`` networks by :class:`ImageFolderLoader`."""

    loading = "memory"

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
        name: str = "imagefolder",
    ) -> None:
        super().__init__(x, y, len(class_names), mean, std, name)
        self.class_names = tuple(class_names)
        self._input_size = input_size

    @property
    def input_size(self) -> int:
        return self._input_size

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageFolderSet:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageFolderSet(self.x[idx], self.y[idx], self.class_names, self.mean, self.std, self._input_size)

    def make_loader(self, batch_size: int, **kw: Any) -> ImageFolderLoader:
        return ImageFolderLoader(self, batch_size, **kw)


class StreamingFolderSet:
    """An imagefolder split decoded on the fly by DataLoader workers, with the attributes of a
    :class:`~rayprune.engine.data.Dataset` the engine reads (``x`` excepted)."""

    loading = "stream"
    channels = 3

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
        workers: int,
        name: str = "imagefolder",
    ) -> None:
        self.files = list(files)
        self.y = torch.as_tensor(list(labels), dtype=torch.int64)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.input_size, self.workers, self.name = input_size, workers, name

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"StreamingFolderSet({self.name!r}, n={len(self)}, classes={self.num_classes})"

    def subset(self, indices: torch.Tensor | Sequence[int]) -> StreamingFolderSet:
        picked = torch.as_tensor(indices, dtype=torch.int64)
        part = copy.copy(self)
        part.files = [self.files[i] for i in picked.tolist()]
        part.y = self.y[picked]
        return part

    def make_loader(self, batch_size: int, **kw: Any) -> ImageFolderLoader:
        return ImageFolderLoader(self, batch_size, **kw)  # type: ignore[arg-type]  # reads what Loader reads


class ImageFolderLoader(Loader):
    """The :class:`~rayprune.engine.data.Loader` of both imagefolder sets: the same order, crops
    and flips from ``(seed, epoch)``, whether the images come from the device or from workers."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = cast("ImageFolderSet | StreamingFolderSet", self.dataset)
        n, size = len(ds), ds.input_size
        params = None
        order = torch.arange(n)
        if self.train:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
            params = sample_resized_crops(n, stored_side(size), gen).to(self.device)
        for i, (images, y) in enumerate(self._batches(ds, order)):
            lo = i * self.batch_size
            if params is None:
                x = center_crop(images, size)
            else:
                x = resized_crop_flip(images, params[lo : lo + len(images)], size)
            x = as_image_batch(x).div_(255.0)
            yield (self.normalize(x) if self.normalized else x), y

    def _batches(
        self, ds: ImageFolderSet | StreamingFolderSet, order: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``[B, S, S, C]`` batches on the device, in ``order``."""
        if isinstance(ds, ImageFolderSet):
            images, labels = ds.on_device(self.device), ds.y.to(self.device)
            order = order.to(self.device)
            for i in range(len(self)):
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                yield images[idx], labels[idx]
            return
        batches = _decoded_batches(
            ds.files,
            ds.y.tolist(),
            stored_side(ds.input_size),
            ds.workers,
            order.tolist(),
            self.batch_size,
            self.drop_last,
            pin_memory=self.device.type == "cuda",
        )
        for images, y in batches:
            yield images.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Loading, with the decode and statistics caches
# --------------------------------------------------------------------------------------------


def _cache_folder(tree: FolderTree, side: int, cache_dir: str | None) -> Path:
    """One folder per (tree content, decoded side): a changed, added or removed file gives a new one."""
    listing = [
        (split, str(p.relative_to(tree.root)), p.stat().st_size, p.stat().st_mtime_ns)
        for split in ("train", tree.eval_split)
        for p in tree.files[split]
    ]
    key = json.dumps([_CACHE_VERSION, str(tree.root), side, tree.classes, listing])
    root = Path(cache_dir).expanduser() if cache_dir else Path.cwd() / ".rayprune-cache"
    return root / f"imagefolder-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _decoded_splits(tree: FolderTree, side: int, workers: int, folder: Path) -> dict[str, torch.Tensor]:
    """``{"train": x, "eval": x}`` uint8, from the cache when it holds them, else decoded and cached."""
    path = folder / "images.pt"
    if path.is_file():
        cached = safe_load(path, "imagefolder cache", f"delete {folder} to decode the images again")
        if all(isinstance(cached.get(k), torch.Tensor) for k in ("train", "eval")):
            return {k: cached[k] for k in ("train", "eval")}
    splits = {
        "train": _decode_all(tree.files["train"], tree.labels["train"], side, workers),
        "eval": _decode_all(tree.files[tree.eval_split], tree.labels[tree.eval_split], side, workers),
    }
    atomic_save(splits, path)
    return splits


def _stats_from_tensor(x: torch.Tensor) -> tuple[list[float], list[float]]:
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in x.split(1024):
        c = chunk.double()
        total += c.sum(dim=(0, 2, 3))
        squares += (c * c).sum(dim=(0, 2, 3))
    return _mean_std(total, squares, x.shape[0] * x.shape[2] * x.shape[3])


def _stats_streamed(tree: FolderTree, side: int, workers: int) -> tuple[list[float], list[float]]:
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for images, _ in _decoded_batches(tree.files["train"], tree.labels["train"], side, workers):
        c = images.double()
        total += c.sum(dim=(0, 1, 2))
        squares += (c * c).sum(dim=(0, 1, 2))
    return _mean_std(total, squares, len(tree.files["train"]) * side * side)


def _mean_std(total: torch.Tensor, squares: torch.Tensor, count: int) -> tuple[list[float], list[float]]:
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return (mean / 255).tolist(), (std / 255).clamp_min(1e-3).tolist()  # a flat channel must not divide by 0


def _train_stats(folder: Path, compute: Any, given: ImageFolderOptions) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The options' mean and std, else the cached ones, else ``compute()``'s (then cached)."""
    if given.mean is not None and given.std is not None:
        return given.mean, given.std
    path = folder / "stats.json"
    try:
        stats = json.loads(path.read_text())
        mean, std = [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
    except (OSError, ValueError, KeyError, TypeError):
        mean, std = compute()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".stats.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"mean": mean, "std": std}) + "\n")
        os.replace(tmp, path)
    return given.mean or tuple(mean), given.std or tuple(std)


def load_imagefolder(
    data_dir: str | Path | None,
    download: bool | None = None,
    *,
    input_size: int | None = None,
    **options: Any,
) -> tuple[ImageFolderSet | StreamingFolderSet, ImageFolderSet | StreamingFolderSet]:
    """``(train, eval)`` of the tree at ``data_dir`` (see the module docstring).

    Args:
        data_dir: the folder holding ``train/`` and ``val/`` (and maybe ``test/``).
        download: ignored (the images are the user's).
        input_size: the network's input side (default :data:`DEFAULT_INPUT_SIZE`).
        options: :class:`ImageFolderOptions` fields.

    Raises:
        DataError: bad data (see :func:`scan_tree`), or an image that fails to decode.
        InputError: an unknown or invalid option.
    """
    opts = validated(ImageFolderOptions, options)
    size = int(input_size or DEFAULT_INPUT_SIZE)
    side = stored_side(size)
    tree = scan_tree(data_dir)
    workers = min(8, os.cpu_count() or 1) if opts.workers is None else opts.workers
    folder = _cache_folder(tree, side, opts.cache_dir)
    limit = DEFAULT_MEMORY_LIMIT_GB if opts.memory_limit_gb is None else opts.memory_limit_gb
    decoded_bytes = (len(tree.files["train"]) + len(tree.files[tree.eval_split])) * 3 * side * side
    ev = tree.eval_split
    if decoded_bytes <= limit * 1e9:
        x = _decoded_splits(tree, side, workers, folder)
        mean, std = _train_stats(folder, lambda: _stats_from_tensor(x["train"]), opts)
        labels = {"train": tree.labels["train"], "eval": tree.labels[ev]}
        train, test = (
            ImageFolderSet(x[k], torch.as_tensor(labels[k]), tree.classes, mean, std, size) for k in ("train", "eval")
        )
        return train, test
    mean, std = _train_stats(folder, lambda: _stats_streamed(tree, side, workers), opts)
    return (
        StreamingFolderSet(tree.files["train"], tree.labels["train"], tree.classes, mean, std, size, workers),
        StreamingFolderSet(tree.files[ev], tree.labels[ev], tree.classes, mean, std, size, workers),
    )


register_dataset(
    DatasetInfo(
        "imagefolder",
        load_imagefolder,
        num_classes=2,  # a placeholder: the classes are the folder's (trials read them from the data)
        input_size=DEFAULT_INPUT_SIZE,
        from_folder=True,
        options=("input_size", *ImageFolderOptions.model_fields),
        check=scan_tree,
    )
)
