"""A sweep of a user module ships its code to the Ray workers (``runtime_env`` ``py_modules``),
so trials on nodes where the file's path does not exist (or the package is not installed) can
import it; tested on a local Ray whose workers find the file only in what the driver shipped."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import ray

from rayprune import models
from rayprune.models.sources import shipped_folder
from rayprune.orchestration.sweep import _init_ray
from rayprune.orchestration.user_code import user_code_env

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "two_branch.py"


@ray.remote
def resolved_on_a_worker(source: str) -> tuple[str, dict[str, int]]:
    """Where the worker finds the source's file, and the widths it traces there."""
    from rayprune import models as worker_models
    from rayprune.models.sources import located

    path = source.rpartition(":")[0]
    return str(located(path)), worker_models.full_spec(source, num_classes=4, input_size=8)["widths"]


@pytest.mark.slow  # starts a local Ray
@pytest.mark.ray
def test_the_driver_ships_a_user_file_that_workers_import_without_its_path(tmp_path):
    file = tmp_path / "nets" / "mine.py"
    file.parent.mkdir()
    shutil.copy(EXAMPLE, file)
    source = f"{file}:two_branch"
    want = models.full_spec(source, num_classes=4, input_size=8)["widths"]
    assert _init_ray(None, 1, source)  # what run_sweep does with the sweep's model
    try:
        file.unlink()  # from now on only the shipped copy exists
        where, widths = ray.get(resolved_on_a_worker.remote(source), timeout=120)
    finally:
        ray.shutdown()
    assert widths == want
    assert Path(where).name == "mine.py" and Path(where).parent.name == shipped_folder(str(file))


def test_what_is_shipped_for_each_kind_of_source(tmp_path, monkeypatch):
    package = tmp_path / "src" / "mynets"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").touch()
    (package / "sub" / "__init__.py").write_text("def net(num_classes=10): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    with user_code_env("mynets.sub:net") as env:
        assert env == {"py_modules": [str(package)]}  # a local package: its top-level folder
    file = tmp_path / "one.py"
    file.write_text("def net(num_classes=10): ...\n")
    with user_code_env(f"{file}:net") as env:
        (staged,) = env["py_modules"]
        assert Path(staged).name == shipped_folder(str(file))
        assert (Path(staged) / "one.py").read_text() == file.read_text()
    assert not Path(staged).exists()  # the staged copy lives as long as ray.init needs it
    for nothing_to_ship in ("torchvision:resnet18", "cifar_resnet:56", "rayprune.testing:tiny_spec", "yaml:safe_load"):
        with user_code_env(nothing_to_ship) as env:
            assert env == {}, nothing_to_ship
    assert "mynets" not in sys.modules  # looking it up did not import the user's package
