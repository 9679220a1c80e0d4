"""The GPU validation kit (bench/gpu, issue 12) cannot rot: its CPU smoke mode runs every stage
here, and prepare's 64 MiB check and the CIFAR-10 part format are tested on small fake data."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu import common, stage_b, throughput  # noqa: E402  # importable once REPO is on sys.path

# Ten of the twelve tests run a kit script in a fresh interpreter (the smoke run: every stage).
pytestmark = pytest.mark.slow

META_KEYS = ("meta_git_sha", "meta_code_hash", "meta_torch", "meta_device", "meta_command", "time")


def kit(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # One OpenMP thread: on a loaded 2-core machine spinning threads made the smoke run 5-15x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_fake_cifar(folder: Path, n: int = 20, seed: int = 0) -> Path:
    """Six pickles in the python CIFAR-10 release format, ``n`` random images each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}, f)
    return folder


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpukit")
    res = kit(
        "gpu/run.py",
        "--command",
        "all",
        "--smoke",
        "--out",
        str(base / "out"),
        "--kit",
        str(base / "kit"),
        "--preflight-methods",
        "uniform,ast",
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = common.read_rows([base / "out" / "results.jsonl"])
    return rows, res.stdout, base


def test_smoke_runs_every_stage_and_records_meta(smoke):
    rows, stdout, _base = smoke
    assert {r["stage"] for r in rows} == {"preflight", "A", "calibrate", "packing", "B", "C"}
    for r in rows:
        for key in META_KEYS:
            assert key in r, (key, r["stage"])
        assert r["meta_device"] == "cpu" and r["meta_code_hash"]
    assert all(r["ok"] for r in rows if r["stage"] == "preflight"), [r for r in rows if not r.get("ok", True)]
    assert {r["check"] for r in rows if r["stage"] == "preflight"} >= {
        "imports",
        "device",
        "engine",
        "method:ast",
        "capture",
        "stage_b_config",
    }
    assert not [r for r in rows if r.get("error")]
    # The printed summary is what the device tool's output tail shows.
    for table in ("| stage A phase | arm |", "| stage B arm |", "| stage C net |"):
        assert table in stdout


def test_smoke_stage_a_interleaved_rows(smoke):
    rows, _, base = smoke
    arms = [r for r in rows if r["stage"] == "A" and r.get("kind") == "arm" and r["phase"] == "eager"]
    assert {r["arm"] for r in arms} == {
        "reference/fp32/eager",
        "engine/fp32/eager",
        "reference/bf16_cl/eager",
        "engine/bf16_cl/eager",
    }
    for r in arms:
        for key in ("img_s", "step_ms", "epoch_s", "tflops"):
            assert finite(r[key]) and r[key] > 0, (r["arm"], key, r[key])
        assert r["rounds"] == 2 and len(r["img_s_all"]) == 2
    ratios = [r for r in rows if r["stage"] == "A" and r.get("kind") == "ratio" and r["phase"] == "eager"]
    assert len(ratios) == 4 and all(finite(r["median_ratio"]) and r["median_ratio"] > 0 for r in ratios)
    cal = next(r for r in rows if r["stage"] == "calibrate")
    assert finite(cal["epoch_s"]) and cal["epoch_s"] > 0
    saved = json.loads((base / "kit" / common.STATE / "calibration.json").read_text())
    assert saved["epoch_s"] == pytest.approx(cal["epoch_s"])


def test_smoke_stage_a_captured_phase(smoke):
    """Per batch size: the unchanged reference loop (its source hash recorded), the eager engine and
    the graph step (uncaptured on the CPU; torch.compile's reduce-overhead arm runs on CUDA only)."""
    rows, stdout, _ = smoke
    capture = [r for r in rows if r["stage"] == "A" and r.get("phase") == "capture"]
    arms = {r["arm"] for r in capture if r.get("kind") == "arm"}
    assert arms == {f"{loop}/b{b}" for b in (16, 32) for loop in ("reference/fp32/eager", "engine/bf16_cl/eager")} | {
        f"engine/bf16_cl/captured/b{b}" for b in (16, 32)
    }
    for r in capture:
        if r.get("kind") == "arm":
            assert finite(r["img_s"]) and r["img_s"] > 0 and r["rounds"] == 2, r["arm"]
            assert r["reference_hash"] == throughput.reference_source_hash()
    ratios = [r for r in capture if r.get("kind") == "ratio"]
    assert len(ratios) == 6 and all(finite(r["median_ratio"]) for r in ratios)
    even = [r for r in capture if r.get("kind") == "break_even"]
    assert [r["batch_size"] for r in even] == [16, 32]
    assert all(finite(r["capture_s"]) and finite(r["captured_step_ms"]) for r in even)
    assert "capture break-even at batch 16" in stdout


def test_smoke_packing(smoke):
    rows, stdout, _ = smoke
    packed = [r for r in rows if r["stage"] == "packing"]
    assert [(r["kind"], r["processes"], r["resources_gpu"]) for r in packed] == [
        ("packing", 1, 1.0),
        ("packing", 2, 0.5),
    ]
    for r in packed:
        assert len(r["per_process_img_s"]) == r["processes"] and all(v > 0 for v in r["per_process_img_s"])
        assert r["aggregate_img_s"] == pytest.approx(sum(r["per_process_img_s"]))
        assert r["captured"] is False and r["max_reserved_mib_per_process"] is None  # the CPU: no graph, no GPU memory
    assert packed[0]["speedup_vs_1"] == 1.0
    assert packed[1]["speedup_vs_1"] == pytest.approx(packed[1]["aggregate_img_s"] / packed[0]["aggregate_img_s"])
    assert "| processes | aggregate img/s |" in stdout


def test_smoke_stage_b_arms(smoke):
    rows, _, _ = smoke
    b = {r["arm"]: r for r in rows if r["stage"] == "B" and r.get("kind") == "arm"}
    assert list(b) == ["teacher"] + [a["arm"] for a in stage_b.ARMS]
    plan = next(r for r in rows if r["stage"] == "B" and r.get("kind") == "plan")
    assert plan["epoch_source"].startswith("calibration")  # stage A's calibration sized stage B
    recipes = set()
    for name, r in b.items():
        assert "error" not in r, (name, r.get("error"))
        for key in ("test_top1", "robust_top1", "macs_pct", "wall_s"):
            assert finite(r[key]), (name, key, r.get(key))
        assert 0 <= r["test_top1"] <= 1 and 0 <= r["robust_top1"] <= 1
        assert r["spec"]["family"] == "cifar_resnet"
        if name != "teacher":
            assert r["macs_pct"] <= 100 * stage_b.FLOPS_TARGET + 1e-6
            assert r["kd_weight"] == stage_b.KD_WEIGHT and r["recipe"]["kd_weight"] == stage_b.KD_WEIGHT
            recipes.add(r["recipe"]["epochs"])
    assert recipes == {stage_b.SMOKE_SIZE["finetune_epochs"]}  # the same fine-tune epochs for every arm
    # The random-search arm repeats as many iterations as the full AST arm ran.
    assert b["ast_random"]["hparams"]["max_iterations"] == b["ast"]["iterations"]
    assert b["ast_random"]["hparams"]["freeze_alpha"] is True


def test_smoke_stage_c_latency(smoke):
    rows, _, _ = smoke
    nets = [r for r in rows if r["stage"] == "C" and r.get("kind") == "net"]
    groups = {r["group"] for r in nets}
    assert groups == {"fixed:cifar_resnet:tiny", "stage_b"}
    assert any(r["round8"] for r in nets)
    for r in nets:
        for key in ("macs_speedup", "speedup_b1", "speedup_b64", "latency_ms_b1_p50", "latency_ms_b64_p50"):
            assert finite(r[key]) and r[key] > 0, (r["net"], key)
        for key in ("ort_ms_t1_p50", "ort_ms_t1_p90", "speedup_ort_t1"):  # ONNX Runtime, one thread
            assert finite(r[key]) and r[key] > 0, (r["net"], key)
        assert r["realised_b64"] == pytest.approx(r["speedup_b64"] / r["macs_speedup"])
        assert r["realised_ort_t1"] == pytest.approx(r["speedup_ort_t1"] / r["macs_speedup"])
    assert {r["net"] for r in nets if r["group"] == "stage_b"} >= {f"B:{a['arm']}" for a in stage_b.ARMS}


def test_collect_writes_dated_results_file(smoke, tmp_path):
    _, _, base = smoke
    res = kit("gpu/collect.py", str(base / "out" / "results.jsonl"), "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith("_cpu.jsonl") and files[1].endswith("_cpu.md")
    again = kit("gpu/collect.py", str(base / "out" / "results.jsonl"), "--out-dir", str(tmp_path))
    assert again.returncode == 0
    n = len((base / "out" / "results.jsonl").read_text().splitlines())
    assert len((tmp_path / files[0]).read_text().splitlines()) == n  # no duplicates on a second collect


def test_stage_b_config_validates():
    assert stage_b.validate_config(smoke=False) == []
    assert stage_b.validate_config(smoke=True) == []


def test_stage_b_sizing_picks_what_fits():
    small = stage_b.choose_size(1.0, 1e9, stage_b.ARMS)
    assert small[0] == next(iter(stage_b.SIZES))  # plenty of time: the largest
    tight = stage_b.choose_size(100.0, 10.0, stage_b.ARMS)
    assert tight[0] == list(stage_b.SIZES)[-1]  # nothing fits: the smallest
    name, _size, est = stage_b.choose_size(2.0, 400.0, stage_b.ARMS)
    assert est <= 400.0 or name == list(stage_b.SIZES)[-1]


def test_prepare_packs_checks_and_refuses_over_limit(tmp_path):
    cifar = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    args = [
        "--cifar-dir",
        str(cifar),
        "--kit",
        str(tmp_path / "kit"),
        "--no-wheels",
        "--tree-bytes",
        "1000",
        "--preset",
        "0",
        "--jobs",
        "1",
    ]
    ok = kit("gpu/prepare.py", *args, "--json", str(tmp_path / "plan.json"))
    assert ok.returncode == 0, ok.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [p["command"] for p in plan] == [1, 2, 3] and all(p["ok"] for p in plan)
    for p in plan:
        kit_dir = (tmp_path / "kit").resolve()
        assert p["carry"] == [str(kit_dir / "common"), str(kit_dir / f"part{p['command']}")]
        assert p["total"] == 1000 + sum(p["sizes"].values())
    assert ok.stdout.count("carry = ") == 3 and "bash bench/gpu/device.sh 3" in ok.stdout
    limit = plan[2]["total"] - 1  # command 3 one byte over
    over = kit("gpu/prepare.py", *args, "--check-only", "--limit-bytes", str(limit))
    assert over.returncode == 2
    err = over.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: error: command ") and "limit" in err[0]


def test_prepare_without_data_is_one_line(tmp_path):
    res = kit("gpu/prepare.py", "--cifar-dir", str(tmp_path / "nope"), "--kit", str(tmp_path / "kit"), "--no-wheels")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "prepare: error:" in res.stderr


def test_parts_round_trip_equals_load_cifar_and_survive_a_lost_part(tmp_path):
    import shutil

    import torch

    from rayprune.engine.data import load_cifar

    cifar = write_fake_cifar(tmp_path / "cifar-10-batches-py", n=30, seed=1)
    kit_dir = tmp_path / "kit"
    common_parts = kit(
        "gpu/prepare.py",
        "--cifar-dir",
        str(cifar),
        "--kit",
        str(kit_dir),
        "--no-wheels",
        "--tree-bytes",
        "0",
        "--preset",
        "0",
        "--jobs",
        "1",
    )
    assert common_parts.returncode == 0, common_parts.stderr
    train, test, info = common.cifar_from_parts(kit_dir)
    ref_train, ref_test = load_cifar(cifar, "cifar10")
    assert torch.equal(train.x, ref_train.x) and torch.equal(train.y, ref_train.y)
    assert torch.equal(test.x, ref_test.x) and torch.equal(test.y, ref_test.y)
    assert train.mean == ref_train.mean and not info["partial"] and info["train_n"] == 150
    # A cold machine lost parts 1 and 2: command 3 still has data_batch_5 and the test set.
    shutil.rmtree(kit_dir / "part1")
    shutil.rmtree(kit_dir / "part2")
    train, test, info = common.cifar_from_parts(kit_dir)
    assert info["partial"] and info["train_batches"] == ["data_batch_5"] and len(train) == 30 and len(test) == 30
    # A damaged copy is refused, not silently used.
    blob = kit_dir / "part3" / "test_batch.img.xz"
    raw = common.lzma.decompress(blob.read_bytes())
    blob.write_bytes(common.lzma.compress(bytes([raw[0] ^ 1]) + raw[1:]))
    with pytest.raises(ValueError, match="checksum"):
        common.cifar_from_parts(kit_dir)


def test_run_without_parts_is_one_clear_line(tmp_path):
    res = kit(
        "gpu/run.py",
        "--stages",
        "B",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        "--kit",
        str(tmp_path / "empty"),
    )
    assert res.returncode == 2
    assert "run: error: stage B: no CIFAR-10 training batch" in res.stdout
    row = common.read_rows([tmp_path / "out" / "results.jsonl"])[0]
    assert row["stage"] == "B" and row["error"].startswith("missing data")


def test_train_throughput_interleaves(tmp_path):
    res = kit(
        "train_throughput.py",
        "--synthetic",
        "--model",
        "cifar_resnet:tiny",
        "--steps",
        "2",
        "--rounds",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ratio ") == 4 and "(min " in res.stdout and "2 rounds" in res.stdout
