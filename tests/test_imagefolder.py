"""The imagefolder dataset: your own ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.

One generated tree (3 classes of small PNGs, one of them grayscale, one RGBA, one a palette)
is trained in memory and streamed; both feed the same batches, so the runs' records agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayprune import models
from rayprune.cli import main
from rayprune.engine import imagefolder
from rayprune.engine.data import DataError, load_dataset, make_loader
from rayprune.engine.imagefolder import stored_side
from rayprune.engine.utils import image_layout
from rayprune.errors import InputError
from rayprune.export import export_subnet
from rayprune.methods import get_method
from rayprune.models import subnet_io
from rayprune.runner import TrialConfig, run_trial

CLASSES = ("cats", "dogs", "owls")
COLOURS = {"cats": (200, 40, 40), "dogs": (40, 200, 40), "owls": (40, 40, 200)}
SIZE = 16  # the input side the tests train at; images are decoded at stored_side(16) = 18


def write_tree(root: Path, train: int = 6, val: int = 3) -> Path:
    """Noisy single-colour PNGs of 20x24 per class, plus a grey, an RGBA and a palette image."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    Image.fromarray(np.full((20, 20), 128, np.uint8), "L").save(root / "train" / "cats" / "grey.png")
    Image.fromarray(np.full((20, 20, 4), (10, 20, 30, 0), np.uint8), "RGBA").save(root / "train" / "dogs" / "rgba.png")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 40, 40, 200])  # colour 1 is the owls' blue
    palette.save(root / "train" / "owls" / "p.png")
    (root / "train" / "owls" / ".DS_Store").write_bytes(b"\0not an image")  # hidden files are skipped
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("images"))


def load(tree: Path, cache: Path, **options):
    return load_dataset("imagefolder", tree, input_size=SIZE, workers=0, cache_dir=str(cache), **options)


def test_classes_come_from_the_folders_and_every_mode_becomes_rgb(tree, tmp_path):
    train, test = load(tree, tmp_path)
    assert (train.loading, test.loading) == ("memory", "memory")
    assert train.class_names == CLASSES and train.num_classes == 3 and train.input_size == SIZE
    assert (len(train), len(test)) == (3 * 6 + 3, 3 * 3)
    assert train.x.shape == (21, 3, stored_side(SIZE), stored_side(SIZE)) == (21, 3, 18, 18)
    files = imagefolder.scan_tree(tree).files["train"]
    names = [p.name for p in files]
    grey, rgba, palette = (train.x[names.index(n)] for n in ("grey.png", "rgba.png", "p.png"))
    assert torch.all(grey == 128)  # L repeated over R, G, B
    assert grey.shape[0] == rgba.shape[0] == palette.shape[0] == 3
    assert rgba[:, 5, 5].tolist() == [10, 20, 30]  # alpha dropped
    assert palette[:, 5, 5].tolist() == [40, 40, 200]
    assert train.y.tolist() == [0] * 7 + [1] * 7 + [2] * 7


def test_memory_and_stream_feed_the_same_batches(tree, tmp_path):
    mem_train, mem_test = load(tree, tmp_path)
    stream_train, stream_test = load(tree, tmp_path, memory_limit_gb=0)  # anything above 0 bytes streams
    assert (stream_train.loading, stream_test.loading) == ("stream", "stream")
    assert stream_train.mean == mem_train.mean and stream_train.std == mem_train.std
    for a, b, train in ((mem_train, stream_train, True), (mem_test, stream_test, False)):
        loaders = [make_loader(ds, 8, train=train, seed=3) for ds in (a, b)]
        for loader in loaders:
            loader.set_epoch(2)
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == 2  # train: 21 // 8 (drop_last); eval: ceil(9 / 8)
        for (xa, ya), (xb, yb) in zip(*batches, strict=True):
            assert xa.shape[1:] == (3, SIZE, SIZE) and xa.is_contiguous(memory_format=image_layout(xa.device))
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # the epoch's crops and flips differ from another epoch's
    loader = make_loader(mem_train, 8, train=True, seed=3)
    first = next(iter(loader))[0]
    loader.set_epoch(3)
    assert not torch.equal(first, next(iter(loader))[0])
    # a subset keeps the loading, the classes and the input size
    part = stream_train.subset([0, 7, 14])
    assert part.loading == "stream" and part.class_names == CLASSES and part.y.tolist() == [0, 1, 2]


def test_mean_and_std_are_computed_on_train_once_then_read_from_the_cache(tree, tmp_path, monkeypatch):
    train, _ = load(tree, tmp_path)
    pixels = train.x.double() / 255  # the decoded training split, per channel
    assert train.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert train.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    (cache,) = tmp_path.glob("imagefolder-*")
    assert sorted(p.name for p in cache.iterdir()) == ["images.pt", "stats.json"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "_decode_all", no_decoding)
    monkeypatch.setattr(imagefolder, "_stats_from_tensor", no_decoding)
    monkeypatch.setattr(imagefolder, "_stats_streamed", no_decoding)
    again, _ = load(tree, tmp_path)
    streamed, _ = load(tree, tmp_path, memory_limit_gb=0)
    assert again.mean == streamed.mean == train.mean and torch.equal(again.x, train.x)
    given, _ = load(tree, tmp_path, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25])
    assert (given.mean, given.std) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.25))


def test_a_test_split_replaces_val_and_options_are_checked(tmp_path):
    root = write_tree(tmp_path / "t", train=2, val=1)
    for name in CLASSES:
        shutil.copytree(root / "val" / name, root / "test" / name)
        shutil.copy(root / "val" / name / "0.png", root / "test" / name / "extra.png")
    _, test = load(root, tmp_path / "cache")
    assert len(test) == 2 * 3  # test/ (two per class), not val/ (one per class)
    with pytest.raises(InputError, match="memory_limit"):
        load(root, tmp_path / "cache", memory_limit_gb=-1)
    with pytest.raises(InputError, match="dataset 'digits' has no option workers"):
        load_dataset("digits", workers=2)


def run(tree: Path, out: Path, method: str, **options) -> dict:
    """``rayprune run --smoke`` on the tree at 16 px, without the latency timing and the
    corruption suite (seconds of forward passes that these tests do not look at)."""
    cfg = TrialConfig(
        method=method,
        hparams=dict(get_method(method).smoke),
        model="cifar_resnet:tiny",
        shortcut="avgpool_conv",
        dataset="imagefolder",
        data_dir=str(tree),
        dataset_options={"workers": 0, "cache_dir": str(out.parent / "cache"), **options},
        input_size=SIZE,
        flops_target=0.5,
        finetune={"epochs": 1, "batch_size": 8},
        device="cpu",
        measure_latency=False,
        robust=False,
    )
    return run_trial(cfg, out, progress=False)


def schema(value):
    """The keys of nested dicts (a record's shape, not its numbers)."""
    if isinstance(value, dict):
        return {k: schema(v) for k, v in value.items()}
    return type(value).__name__


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uniform", "l1"])
def test_smoke_runs_train_in_memory_and_streaming_with_one_record_schema(tree, tmp_path, method):
    memory = run(tree, tmp_path / "memory", method)
    stream = run(tree, tmp_path / "stream", method, memory_limit_gb=0)
    finals = [r["final"] for r in (memory, stream)]
    assert [f["source"]["data_loading"] for f in finals] == ["memory", "stream"]
    assert schema(finals[0]) == schema(finals[1])
    assert finals[0]["spec"] == finals[1]["spec"] and finals[0]["spec"]["num_classes"] == 3
    # the same batches: the same training, the same accuracy
    assert finals[0]["metrics"]["test_top1"] == finals[1]["metrics"]["test_top1"]
    assert finals[0]["macs"] == models.macs(finals[0]["spec"], SIZE)
    prep = finals[0]["source"]["preprocessing"]
    assert prep["class_names"] == list(CLASSES) and prep["input_size"] == SIZE
    saved = subnet_io.load(tmp_path / "memory" / "final")
    assert saved.input_size == SIZE and saved.record["source"]["preprocessing"] == prep
    if method == "uniform":
        check_export(saved, tmp_path / "export")


def check_export(saved: subnet_io.SavedSubnet, out: Path) -> None:
    """The exported card states the classes, mean, std and input size the subnet expects."""
    prep = saved.record["source"]["preprocessing"]
    export_subnet(
        saved.spec,
        saved.state_dict,
        saved.metrics,
        out,
        input_size=saved.require_input_size(),
        exporter="torchscript",
        preprocessing=prep,
    )
    card = (out / "model_card.md").read_text()
    assert f"* classes (logit i is class i): `{list(CLASSES)}`" in card
    assert f"* mean: `{[round(m, 6) for m in prep['mean']]}`" in card
    assert f"* std: `{[round(s, 6) for s in prep['std']]}`" in card
    assert f"float32 tensor [batch, 3, {SIZE}, {SIZE}]" in card


def break_tree(root: Path, case: str) -> str:
    """Spoil a fresh tree one way; returns what the error line must name."""
    if case == "empty class folder":
        for p in (root / "val" / "owls").iterdir():
            p.unlink()
        return f"class folder {root / 'val' / 'owls'} holds no images"
    if case == "classes differ":
        (root / "val" / "owls").rename(root / "val" / "bats")
        return "only in train/: owls; only in val/: bats"
    if case == "not an image":
        (root / "train" / "dogs" / "notes.txt").write_text("hello")
        return f"{root / 'train' / 'dogs' / 'notes.txt'} is not an image"
    if case == "one class":
        for split in ("train", "val"):
            for name in ("dogs", "owls"):
                shutil.rmtree(root / split / name)
        return "has 1 class folder (cats); a classifier needs at least 2"
    assert case == "no train"
    shutil.rmtree(root / "train")
    return f"{root} has no train/ folder"


@pytest.mark.parametrize("case", ["empty class folder", "classes differ", "not an image", "one class", "no train"])
def test_bad_data_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, case):
    root = write_tree(tmp_path / "data", train=2, val=1)
    needle = break_tree(root, case)
    monkeypatch.chdir(tmp_path)  # the default cache folder is the working directory's
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["run", "--method", "uniform", "--model", "cifar_resnet:tiny", "--dataset", "imagefolder"]
    argv += ["--data-dir", str(root), "--input-size", str(SIZE), "--data-option", "workers=0"]
    argv += ["--flops-target", "0.5", "--out", "out"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayprune: error: ") and err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no .rayprune-cache/
    with pytest.raises(DataError):
        imagefolder.scan_tree(root)


def test_a_sweep_file_takes_the_imagefolder_keys_and_hands_them_to_every_trial(tmp_path, monkeypatch):
    import yaml

    from rayprune.orchestration.config import SweepConfigError, parse_sweep
    from rayprune.orchestration.sweep import param_space

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml").read_text())
    assert "dataset_options" not in param_space(parse_sweep(raw), None)["base"]  # other datasets: as before
    raw["dataset"] = {"name": "imagefolder", "data_dir": "imgs", "memory_limit_gb": 0.5, "mean": [0.5, 0.5, 0.5]}
    raw["dataset"] |= {"std": [0.25, 0.25, 0.25], "workers": 2}
    cfg = parse_sweep(raw)
    options = {
        "memory_limit_gb": 0.5,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "workers": 2,
        "cache_dir": str(tmp_path / ".rayprune-cache"),  # one cache for every trial, where the sweep started
    }
    assert cfg.dataset.data_dir == str(tmp_path / "imgs") and cfg.dataset.options() == options
    base = param_space(cfg, None)["base"]
    assert base["dataset"] == "imagefolder" and base["dataset_options"] == options
    assert TrialConfig(**base, method="uniform", flops_target=0.5).dataset_options == options
    raw["dataset"] = {"name": "cifar10", "workers": 2}
    with pytest.raises(SweepConfigError, match="dataset 'cifar10' has no setting workers"):
        parse_sweep(raw)


def test_a_sweep_on_bad_images_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    import yaml

    from rayprune.cli import sweep_main
    from rayprune.testing.sweeps import mini_sweep

    root = write_tree(tmp_path / "data", train=2, val=1)
    needle = break_tree(root, "classes differ")
    monkeypatch.chdir(tmp_path)
    raw = mini_sweep(tmp_path, dataset={"name": "imagefolder", "data_dir": str(root)}, input_size=SIZE)
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(raw))
    assert sweep_main(["--space", str(tmp_path / "mini.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayprune: error: imagefolder: the classes of") and needle in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mini.yaml"]  # no results, mlflow.db, cache
