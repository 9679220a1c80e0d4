"""Engine data: dataset readers, seeded splits, the device-resident loader and its augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayprune.engine import data
from rayprune.engine.data import (
    DATASETS,
    DataError,
    Dataset,
    holdout_per_class,
    load_dataset,
    make_loader,
    random_crop_flip,
    register_dataset,
    sample_crop_flip,
    split_per_class,
    synthetic_dataset,
)
from rayprune.engine.utils import image_layout

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_dataset(n=12, size=8, classes=3):
    x = torch.arange(n * 3 * size * size, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 3, size, size)
    y = torch.arange(n) % classes
    return Dataset(x, y, classes, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), "tiny")


# -- CIFAR pickle reader ------------------------------------------------------------------------


def write_fake_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """A cifar-10-batches-py folder in the real format (uint8 rows of 3072, b'labels')."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels, b"batch_label": name.encode()}, f)
        written[name] = (rows, labels)
    return written


def test_cifar_pickle_reader_keeps_pixels_layout_and_labels(tmp_path):
    written = write_fake_cifar10(tmp_path)
    train, test = load_dataset("cifar10", tmp_path, download=False)
    assert (len(train), len(test)) == (20, 4)
    assert train.x.dtype == torch.uint8 and train.x.shape[1:] == (3, 32, 32)
    rows, labels = written["data_batch_2"]
    # Sample 1 of batch 2 is sample 5 overall; a CIFAR row is R plane, G plane, B plane, row-major.
    assert torch.equal(train.x[5, 1, 0, :], torch.from_numpy(rows[1, 1024:1056]))
    assert train.y[4:8].tolist() == labels
    assert train.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert train.num_classes == 10 and train.name == "cifar10"


def test_cifar_reader_names_a_missing_batch_file(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", tmp_path, download=False)


def test_missing_dataset_offline_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRUNE_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def offline(name, root):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "_download_cifar", offline)
    with pytest.raises(DataError) as err:
        load_dataset("cifar100")  # download=None: tries, fails, explains
    msg = str(err.value)
    assert str(tmp_path / "env" / "cifar-100-python") in msg
    assert str(tmp_path / "home" / ".cache" / "rayprune" / "data" / "cifar-100-python") in msg
    assert "name resolution" in msg and "RAYPRUNE_DATA_DIR" in msg and "data_dir" in msg
    with pytest.raises(DataError, match="download=False"):
        load_dataset("cifar10", tmp_path / "nowhere", download=False)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="cifar10, cifar100, digits, imagefolder, imagenet, synthetic"):
        load_dataset("mnist")


def test_the_registry_knows_each_dataset_before_loading_it():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "imagefolder", "imagenet", "synthetic"]
    assert [DATASETS.get(n).num_classes for n in DATASETS] == [10, 100, 10, 2, 1000, 10]  # imagefolder: its folders'
    assert [n for n in DATASETS if DATASETS.get(n).downloads] == ["cifar10", "cifar100"]
    assert [n for n in DATASETS if DATASETS.get(n).from_folder] == ["imagefolder", "imagenet"]
    for name in ("digits", "synthetic"):  # the offline ones: what the registry says is what loads
        info, (train, test) = DATASETS.get(name), load_dataset(name)
        assert (train.num_classes, train.input_size) == (info.num_classes, info.input_size)
        assert (test.num_classes, test.input_size) == (info.num_classes, info.input_size)
    with pytest.raises(ValueError, match="dataset 'digits' is already registered"):
        register_dataset(DATASETS.get("digits"))


@pytest.mark.skipif(not (SHARED_CIFAR / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 not present")
def test_real_cifar10_loads_50000_and_10000():
    train, test = load_dataset("cifar10", SHARED_CIFAR, download=False)
    assert (len(train), len(test)) == (50000, 10000)
    assert torch.bincount(train.y).tolist() == [5000] * 10
    assert train.x.shape[1:] == (3, 32, 32)


# -- digits and synthetic ------------------------------------------------------------------------


def test_digits_is_a_fixed_stratified_80_20_split_with_three_equal_channels():
    train, test = load_dataset("digits")
    again, _ = load_dataset("digits")
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.2) < 0.01
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    assert train.x.shape[1:] == (3, 8, 8) and int(train.x.max()) == 255
    assert torch.equal(train.x[:, 0], train.x[:, 2])
    assert train.crop_padding == 1


def test_synthetic_is_seeded_and_balanced():
    a, _ = synthetic_dataset(n_train=40, n_test=8, num_classes=4, size=16, seed=3)
    b, _ = synthetic_dataset(n_train=40, n_test=8, num_classes=4, size=16, seed=3)
    c, _ = synthetic_dataset(n_train=40, n_test=8, num_classes=4, size=16, seed=4)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert torch.bincount(a.y).tolist() == [10] * 4 and a.input_size == 16 and a.crop_padding == 2


def test_synthetic_is_made_at_the_input_size_asked_for():
    # a sweep's input_size reaches the loader: 8x8 images for an 8x8 sweep, 32x32 by default
    small, small_test = load_dataset("synthetic", input_size=8)
    default, _ = load_dataset("synthetic")
    assert small.x.shape[1:] == small_test.x.shape[1:] == (3, 8, 8) and small.input_size == 8
    assert default.x.shape[1:] == (3, 32, 32) and torch.equal(small.y, default.y)  # the same labels, smaller images


# -- splits ------------------------------------------------------------------------------------


def test_split_per_class_takes_the_fraction_of_every_class():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)
    a, b = split_per_class(labels, 0.5, seed=111)
    assert torch.bincount(labels[a]).tolist() == [5, 3, 2]
    assert sorted(torch.cat([a, b]).tolist()) == list(range(20))
    a2, _ = split_per_class(labels, 0.5, seed=111)
    a3, _ = split_per_class(labels, 0.5, seed=112)
    assert torch.equal(a, a2) and not torch.equal(a, a3)
    a8, _ = split_per_class(labels, 0.8, seed=0)
    assert torch.bincount(labels[a8]).tolist() == [8, 5, 3]  # round(0.8 * 6) = 5, round(3.2) = 3


def test_holdout_per_class_and_bad_arguments():
    labels = torch.tensor([0] * 5 + [1] * 7)
    rest, held = holdout_per_class(labels, 2, seed=0)
    assert torch.bincount(labels[held]).tolist() == [2, 2] and len(rest) == 8
    assert set(rest.tolist()).isdisjoint(held.tolist())
    with pytest.raises(ValueError, match="only 5"):
        holdout_per_class(labels, 5, seed=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_per_class(labels, 1.0, seed=0)


def test_subset_keeps_metadata():
    ds = tiny_dataset()
    sub = ds.subset([3, 1])
    assert torch.equal(sub.x, ds.x[[3, 1]]) and sub.labels.tolist() == [0, 1]
    assert (sub.num_classes, sub.mean, sub.std, sub.name) == (ds.num_classes, ds.mean, ds.std, ds.name)


# -- augmentation and loader --------------------------------------------------------------------


def candidates(img_hwc: torch.Tensor, p: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image, flipped or not (the reference for random_crop_flip)."""
    h, w, _ = img_hwc.shape
    padded = F.pad(img_hwc.permute(2, 0, 1), (p, p, p, p)).permute(1, 2, 0)
    crops = [padded[dy : dy + h, dx : dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    return crops + [c.flip(1) for c in crops]


def test_random_crop_flip_outputs_are_padded_crops_or_their_mirror_images():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 8, 8, 3), dtype=torch.uint8)  # no zeros: padding is visible
    params = sample_crop_flip(64, 2, torch.Generator().manual_seed(0))
    out = random_crop_flip(images, params, 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for img, aug, (dy, dx, flip) in zip(images, out, params.tolist(), strict=True):
        # candidates() lists the 25 shifts (row-major), then the same 25 mirrored
        assert torch.equal(aug, candidates(img, 2)[25 * flip + 5 * dy + dx])
    assert len({tuple(p) for p in params.tolist()}) > 20  # many distinct shifts, both flips
    assert set(params[:, 2].tolist()) == {0, 1} and set(params[:, 0].tolist()) == set(range(5))


def test_train_loader_is_normalised_in_the_device_layout_shuffled_and_seeded():
    ds = tiny_dataset(n=12)
    loader = make_loader(ds, 5, train=True, seed=1)
    assert len(loader) == 2  # drop_last by default when training: 12 // 5
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=image_layout(x.device))
    low = (0 - torch.tensor(ds.mean)) / torch.tensor(ds.std)
    high = (1 - torch.tensor(ds.mean)) / torch.tensor(ds.std)
    per_channel = x.permute(1, 0, 2, 3).flatten(1)
    assert (per_channel.min(1).values >= low - 1e-6).all() and (per_channel.max(1).values <= high + 1e-6).all()
    again = list(make_loader(ds, 5, train=True, seed=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x)  # a new epoch reshuffles and re-augments


def test_eval_loader_keeps_order_and_exact_pixels():
    ds = tiny_dataset(n=7)
    loader = make_loader(ds, 3, train=False, normalize=False)
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [3, 3, 1]
    assert torch.equal(torch.cat(xs), ds.x.float() / 255) and torch.equal(torch.cat(ys), ds.y)
    norm = next(iter(make_loader(ds, 3, train=False)))[0]
    assert torch.allclose(loader.normalize(xs[0]), norm)


def test_device_copy_is_made_once_per_device():
    ds = tiny_dataset()
    list(make_loader(ds, 4, train=True))
    first = ds.on_device(torch.device("cpu"))
    list(make_loader(ds, 4, train=False))
    assert ds.on_device(torch.device("cpu")) is first


def test_folder_dataset_reads_an_image_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    train = data.FolderDataset(tmp_path, train=True, input_size=32, workers=0)
    val = data.FolderDataset(tmp_path, train=False, input_size=32, workers=1)
    assert (len(train), train.num_classes, train.labels.tolist()) == (6, 2, [0, 0, 0, 1, 1, 1])
    x, y = next(iter(make_loader(train.subset([0, 3, 4]), 3, train=True)))
    assert x.shape == (3, 3, 32, 32) and x.is_contiguous(memory_format=image_layout(x.device))
    assert sorted(y.tolist()) == [0, 1, 1]
    xs = torch.cat([b[0] for b in make_loader(val, 4, train=False, normalize=False)])
    assert xs.shape == (6, 3, 32, 32) and xs.min() >= 0 and xs.max() <= 1


class _FakeCIFAR10:
    """Stands in for torchvision's CIFAR10 download: writes a partial archive, then succeeds or fails."""

    fail = True

    def __init__(self, root, train, download):
        from pathlib import Path

        Path(root, "cifar-10-python.tar.gz.part").write_bytes(b"partial")
        if self.fail:
            raise OSError("network is unreachable")
        Path(root, "cifar-10-batches-py").mkdir(exist_ok=True)


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    target = tmp_path / "new-data-dir"
    with pytest.raises(DataError, match="network is unreachable"):
        load_dataset("cifar10", target)
    assert not target.exists()


def test_successful_download_moves_only_the_dataset_folder(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", type("Ok", (_FakeCIFAR10,), {"fail": False}))
    from rayprune.engine import data

    assert data._find_cifar("cifar10", tmp_path, download=True) == tmp_path / "cifar-10-batches-py"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]


@pytest.mark.slow  # imports scikit-learn (SciPy, pandas) to compare
def test_digits_read_from_the_bundled_csv_equal_scikit_learns_load_digits(monkeypatch):
    import importlib.util

    from sklearn.datasets import load_digits

    from rayprune.engine.data import digits_arrays

    want = load_digits()
    images, labels = digits_arrays()  # the CSV scikit-learn bundles, read without importing it
    assert images.shape == (1797, 8, 8) and np.array_equal(images, want.images) and np.array_equal(labels, want.target)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the file not found: load_digits
    images, labels = digits_arrays()
    assert np.array_equal(images, want.images) and np.array_equal(labels, want.target)
