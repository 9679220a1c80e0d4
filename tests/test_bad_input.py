"""Bad input never costs a traceback, a half-written folder or wasted compute (issue 14).

Every case runs the command in-process (``rayprune.cli.main``) and asserts exit code 2, exactly
one stderr line ``rayprune: error: ...`` naming the problem, and that the working folder is
byte-for-byte as it was. Crafted pickles (an ``os.system`` payload that would create a marker
file) in every file rayprune loads are refused without running.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rayprune import models
from rayprune.models import subnet_io
from rayprune.testing.bad_input import refused

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "run",
    "--method",
    "uniform",
    "--model",
    "cifar_resnet:tiny",
    "--shortcut",
    "avgpool_conv",
    "--dataset",
    "synthetic",
    "--flops-target",
    "0.5",
]
TEACHER = [
    "teacher",
    "--model",
    "cifar_resnet:tiny",
    "--shortcut",
    "avgpool_conv",
    "--dataset",
    "synthetic",
    "--epochs",
    "1",
]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Hostile files
# ---------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_bytes(marker: Path) -> bytes:
    return pickle.dumps({"method": Payload(marker)}, protocol=2)


def write_hostile_torch(path: Path, marker: Path, style: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "pickle":  # a plain (legacy) pickle stream
        path.write_bytes(hostile_bytes(marker))
    else:  # torch's zip format with the payload inside
        torch.save({"method": Payload(marker)}, path)


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(hostile_bytes(marker))
    assert marker.exists()  # so "marker absent" below means "refused", not "payload broken"


def saved_subnet(folder: Path) -> Path:
    spec = models.full_spec("cifar_resnet:tiny", shortcut="avgpool_conv")
    return subnet_io.save(folder, spec, models.build(spec, seed=0).state_dict())


@pytest.mark.parametrize("style", ["pickle", "torch"])
def test_hostile_state_pt_is_refused_without_running(cwd, capsys, style):
    marker = cwd / "MARKER"
    write_hostile_torch(cwd / "out" / "state.pt", marker, style)
    line = refused(capsys, cwd, [*RUN, "--out", "out"], "run state", "state.pt", "--no-resume")
    assert not marker.exists() and ("pickled Python objects" in line or "damaged" in line)


def test_hostile_teacher_weights_are_refused_without_running(cwd, capsys):
    marker = cwd / "MARKER"
    teacher = saved_subnet(cwd / "t")
    write_hostile_torch(teacher / "weights.pt", marker, "torch")
    refused(
        capsys,
        cwd,
        [*RUN, "--kd-weight", "0.5", "--teacher", "t", "--out", "out"],
        "weights.pt",
        "pickled Python objects",
    )
    assert not marker.exists()


def test_hostile_saved_weights_are_refused_without_running(cwd, capsys):
    """`rayprune teacher` reuses a complete folder and reads its weights.pt back."""
    marker = cwd / "MARKER"
    folder = saved_subnet(cwd / "t")
    write_hostile_torch(folder / "weights.pt", marker, "pickle")
    refused(capsys, cwd, [*TEACHER, "--out", "t"], "weights.pt", "save the subnet again")
    assert not marker.exists()


def test_hostile_training_checkpoint_is_refused_without_running(cwd, capsys):
    marker = cwd / "MARKER"
    write_hostile_torch(cwd / ".t.ckpt" / "last.pt", marker, "torch")
    refused(capsys, cwd, [*TEACHER, "--out", "t"], "training checkpoint", "last.pt", "restart that training")
    assert not marker.exists() and not (cwd / "t").exists()


def test_hostile_sweep_teacher_checkpoint_is_refused_before_ray(cwd, capsys):
    marker = cwd / "MARKER"
    folder = saved_subnet(cwd / "t")
    write_hostile_torch(folder / "weights.pt", marker, "torch")
    space = sweep_file(cwd, teacher={"checkpoint": "t"})
    refused(capsys, cwd, ["sweep", "--space", str(space)], "teacher.checkpoint", "weights.pt")
    assert not marker.exists()


def write_cifar10(root: Path, n: int = 4) -> Path:
    """A tiny CIFAR-10 python release (the official layout, pickle protocol 2, bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(n)],
            b"batch_label": name.encode(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_the_restricted_cifar_reader_reads_the_release_format(tmp_path):
    from rayprune.engine.data import load_dataset

    write_cifar10(tmp_path)
    train, test = load_dataset("cifar10", tmp_path, download=False)
    assert (len(train), len(test)) == (20, 4) and train.x.dtype == torch.uint8


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("hostile", "not allowed"),
        ("truncated", "truncated"),
        ("garbage", "damaged or not a pickle"),
        ("wrong_shape", "shape [N, 3072]"),
        ("object_dtype", "not allowed"),
    ],
)
def test_bad_cifar_batch_is_one_line_and_never_runs(cwd, capsys, damage, needle):
    marker = cwd / "MARKER"
    folder = write_cifar10(cwd / "data")
    batch = folder / "data_batch_2"
    if damage == "hostile":
        batch.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2))
    elif damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:5000])
    elif damage == "garbage":
        batch.write_bytes(b"\x00not a pickle " * 150)  # fixed bytes: random ones parse to varied errors
    elif damage == "wrong_shape":
        batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2))
    else:
        batch.write_bytes(
            pickle.dumps({b"data": np.array([Payload(marker)], dtype=object), b"labels": [0]}, protocol=2)
        )
    argv = [
        *RUN[: RUN.index("--dataset")],
        "--dataset",
        "cifar10",
        "--data-dir",
        "data",
        "--flops-target",
        "0.5",
        "--out",
        "out",
    ]
    refused(capsys, cwd, argv, "data_batch_2", needle, "download it again")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# A. no traceback; B. no empty --out left behind; C. validation before work; D. bad values
# ---------------------------------------------------------------------------------------------


def test_inspect_bad_paths_name_the_file_and_the_fix(cwd, capsys):
    (cwd / "adir").mkdir()
    refused(capsys, cwd, ["inspect", "adir"], "'adir' is a directory", "spec JSON file")
    folder = saved_subnet(cwd / "sub")
    refused(capsys, cwd, ["inspect", str(folder / "weights.pt")], "weights.pt", "not text", "spec.json")


def test_spec_enum_given_as_a_list_is_one_line(cwd, capsys):
    spec = {**models.full_spec("cifar_resnet:20"), "block": ["basic"]}
    (cwd / "s.json").write_text(json.dumps(spec))
    refused(capsys, cwd, ["inspect", "s.json"], "'block'", "'basic', 'bottleneck'", "['basic']")
    spec = {**models.full_spec("cifar_resnet:20"), "shortcut": "optiona"}
    (cwd / "s.json").write_text(json.dumps(spec))
    refused(capsys, cwd, ["inspect", "s.json"], "'shortcut'", "did you mean 'option_a'")


@pytest.mark.parametrize("size", ["0", "-5"])
def test_non_positive_input_size_is_refused_by_inspect_run_and_sweep(cwd, capsys, size):
    models.save_spec(models.full_spec("cifar_resnet:20"), cwd / "s.json")
    refused(capsys, cwd, ["inspect", "s.json", "--input-size", size], "--input-size", size)
    refused(capsys, cwd, [*RUN, "--input-size", size, "--out", "out"], "--input-size", size)
    space = sweep_file(cwd, input_size=int(size))
    refused(capsys, cwd, ["sweep", "--space", str(space)], "input_size", size)


def test_run_device_and_out_file(cwd, capsys):
    refused(capsys, cwd, [*RUN, "--device", "tpu", "--out", "out"], "'tpu'", "cpu, cuda")
    (cwd / "afile").write_text("x")
    refused(capsys, cwd, [*RUN, "--out", "afile"], "--out 'afile' is an existing file")
    refused(capsys, cwd, [*TEACHER, "--out", "afile"], "--out 'afile' is an existing file")
    refused(capsys, cwd, [*RUN, "--out", "afile/sub"], "afile' is a file")


def test_run_rejections_leave_no_out_folder(cwd, capsys):
    cases = [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "unifrom"], "did you mean 'uniform'"),
        (["--set", "eval_epochz=1"], "--set eval_epochz: unknown field; did you mean 'eval_epochs'? allowed: "),
        (["--finetune", "epochz=1"], "--finetune epochz: unknown field; did you mean 'epochs'?"),
        (["--max-stage-prune", "0.5,0.5"], "max_stage_prune needs 3 entries"),
        (["--flops-target", "1.5"], "--flops-target", "1.5"),
        (["--kd-weight", "0.5", "--teacher", "missing"], "'missing' does not exist", "rayprune teacher"),
    ]
    for extra, *needles in cases:
        argv = list(RUN)
        if extra[0] == "--method":
            argv[argv.index("uniform")] = extra[1]
            extra = []
        if extra and extra[0] == "--flops-target":
            argv[argv.index("0.5")] = extra[1]
            extra = []
        line = refused(capsys, cwd, argv + extra + ["--out", "out"], *needles)
        assert line.count("got ") <= 1, line
    assert not (cwd / "out").exists()


def test_teacher_folder_with_spec_but_no_weights(cwd, capsys):
    folder = saved_subnet(cwd / "t")
    (folder / "weights.pt").unlink()
    refused(capsys, cwd, [*RUN, "--kd-weight", "0.5", "--teacher", "t", "--out", "out"], "lacks weights.pt")
    space = sweep_file(cwd, teacher={"checkpoint": "t"})
    refused(capsys, cwd, ["sweep", "--space", str(space)], "teacher.checkpoint", "lacks weights.pt")


def test_kd_weight_is_checked_before_a_teacher_is_trained(cwd, capsys):
    refused(capsys, cwd, [*RUN, "--kd-weight", "1.5", "--teacher-epochs", "1", "--out", "out"], "--kd-weight", "1.5")
    refused(
        capsys,
        cwd,
        [*RUN, "--kd-weight", "0.5", "--teacher-epochs", "1", "--finetune", "lr=-1", "--out", "out"],
        "--finetune lr",
    )
    assert not (cwd / "out").exists()


def test_missing_data_is_one_line_before_anything_is_written(cwd, capsys):
    folder = write_cifar10(cwd / "data")
    (folder / "data_batch_3").unlink()
    argv = [*RUN[: RUN.index("--dataset")], "--dataset", "cifar10", "--data-dir", "data", "--flops-target", "0.5"]
    refused(capsys, cwd, [*argv, "--out", "out"], "data_batch_3 is missing")
    refused(
        capsys,
        cwd,
        [
            *TEACHER[: TEACHER.index("--dataset")],
            "--dataset",
            "cifar10",
            "--data-dir",
            "data",
            "--epochs",
            "1",
            "--out",
            "t",
        ],
        "data_batch_3",
    )


def test_bad_resume_state_is_one_line(cwd, capsys):
    (cwd / "out").mkdir()
    (cwd / "out" / "state.pt").write_bytes(b"\x00not a torch file " * 20)  # fixed: random bytes vary
    refused(capsys, cwd, [*RUN, "--out", "out"], "state.pt", "damaged, truncated or not a torch file")
    torch.save([1, 2, 3], cwd / "out" / "state.pt")
    refused(capsys, cwd, [*RUN, "--out", "out"], "state.pt", "holds a list")


def test_train_subset_larger_than_the_set_warns(capsys):
    from rayprune.runner import load_data

    train, _ = load_data("synthetic", None, train_subset=1_000_000)
    err = capsys.readouterr().err.splitlines()
    assert len(train) == 256
    assert err == ["rayprune: warning: --train-subset 1000000 is larger than the set (256 samples); using all of it"]


# ---------------------------------------------------------------------------------------------
# Sweep files: messages a user can act on
# ---------------------------------------------------------------------------------------------


def sweep_file(root: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    raw.update(changes)
    for key, value in list(changes.items()):
        if value is None:
            raw.pop(key)
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_file_messages(cwd, capsys):
    (cwd / "empty.yaml").write_text("")
    refused(capsys, cwd, ["sweep", "--space", "empty.yaml"], "empty.yaml: the file is empty")
    raw = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    raw["gird"] = raw.pop("grid")
    (cwd / "typo.yaml").write_text(yaml.safe_dump(raw))
    line = refused(capsys, cwd, ["sweep", "--space", "typo.yaml"], "gird: unknown field; did you mean 'grid'?")
    assert "more problem" not in line  # the missing 'grid' is the same mistake
    refused(
        capsys,
        cwd,
        ["sweep", "--space", str(sweep_file(cwd, input_size=7))],
        "space.yaml: input_size:",
        "cannot run at 7x7",
    )
    refused(
        capsys,
        cwd,
        ["sweep", "--space", str(sweep_file(cwd, optuna={"stage_prune": [[0.2, 0.8]] * 2}))],
        "optuna.stage_prune",
        "3 stages",
    )
    refused(capsys, cwd, ["sweep", "--space", str(sweep_file(cwd, grid="0.5"))], "grid: must be a mapping")
