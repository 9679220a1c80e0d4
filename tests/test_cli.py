"""`rayprune inspect` / `rayprune run`: outcomes, hand-computed numbers, one-line errors, resume."""

from __future__ import annotations

import json

import pytest

from rayprune import models
from rayprune.cli import main

# A hand-written pruned ResNet-20-shaped spec: depth-pruned stages and narrowed mids.
PRUNED = {
    "family": "cifar_resnet",
    "block": "basic",
    "num_classes": 10,
    "shortcut": "option_a",
    "stem": 16,
    "stages": [[[8, 16], [4, 16], [16, 16]], [[20, 32], [9, 32]], [[40, 64]]],
}


def hand_macs() -> int:
    """k*k*Cin*Cout*H*W per conv at 32/16/8 resolution, option_a shortcut free, fc 64*10+10."""
    px0, px1, px2 = 32 * 32, 16 * 16, 8 * 8
    stem = 9 * 3 * 16 * px0
    stage0 = 9 * px0 * (16 * 8 + 8 * 16 + 16 * 4 + 4 * 16 + 16 * 16 + 16 * 16)
    stage1 = 9 * px1 * (16 * 20 + 20 * 32 + 32 * 9 + 9 * 32)
    stage2 = 9 * px2 * (32 * 40 + 40 * 64)
    return stem + stage0 + stage1 + stage2 + 64 * 10 + 10


def test_inspect_hand_written_pruned_spec(tmp_path, capsys):
    path = tmp_path / "pruned.json"
    path.write_text(json.dumps(PRUNED))
    assert main(["inspect", str(path), "--reference", "cifar_resnet:20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["macs"] == hand_macs() == 14_451_338
    assert out["params"] == sum(p.numel() for p in models.build(PRUNED).parameters())
    assert out["reference_macs"] == 40_551_050
    assert out["macs_ratio"] == pytest.approx(14_451_338 / 40_551_050)
    assert sum(layer["macs"] for layer in out["layers"]) == out["macs"]
    assert [g["name"] for g in out["groups"]][:2] == ["stem", "s0.b0.mid"]


def test_inspect_prints_tables_for_people(tmp_path, capsys):
    path = tmp_path / "pruned.json"
    path.write_text(json.dumps(PRUNED))
    assert main(["inspect", str(path), "--reference", "cifar_resnet:20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"{path}: cifar_resnet, input 32x32, 14,451,338 MACs, "
        f"{sum(p.numel() for p in models.build(PRUNED).parameters()):,} params, 3 stages; "
        f"{100 * 14_451_338 / 40_551_050:.1f}% of cifar_resnet:20's 40,551,050 MACs"
    )
    stem = next(line for line in lines if line.startswith("stem.conv "))
    assert stem.split() == ["stem.conv", "conv", "3", "16", "3", "1", "32x32", f"{9 * 3 * 16 * 32 * 32:,}", "432"]
    groups = [line.split() for line in lines if line.startswith("s1.b1.mid ")]
    assert groups == [["s1.b1.mid", "9", "1", "inner"]]


def test_inspect_input_size_changes_macs(tmp_path, capsys):
    path = tmp_path / "full.json"
    models.save_spec(models.full_spec("cifar_resnet:20"), path)
    assert main(["inspect", str(path), "--input-size", "16", "--json", "--compact"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Every conv runs on a quarter of the pixels; only the fc (650) does not scale.
    assert out["macs"] == (40_551_050 - 650) // 4 + 650


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({**PRUNED, "shortcut": "option_b"}, "'shortcut'"),
        ({**PRUNED, "stages": [[[8, 16]], []]}, "stages[1]"),
        ({**PRUNED, "stages": [[[8, 16, 3]]]}, "stages[0][0]"),
        ({**PRUNED, "stem": 0}, "'stem'"),
        ({**PRUNED, "family": "nope"}, "known:"),
        ({**PRUNED, "extra": 1}, "extra"),
    ],
)
def test_inspect_invalid_spec_one_line_error(tmp_path, capsys, bad, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayprune: error: ") and err.count("\n") == 1 and needle in err


def test_inspect_not_json_and_missing_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    assert main(["inspect", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_bad_inputs_fail_fast_with_one_line(tmp_path, capsys):
    base = ["run", "--model", "cifar_resnet:tiny", "--dataset", "synthetic", "--out", str(tmp_path / "o")]
    cases = [
        (["--method", "nope", "--flops-target", "0.5"], "unknown method 'nope'"),
        (["--method", "uniform", "--flops-target", "1.5"], "--flops-target"),
        (["--method", "uniform", "--flops-target", "0.5", "--set", "bogus=1"], "bogus"),
        (["--method", "uniform", "--flops-target", "0.5", "--kd-weight", "0.9"], "needs a teacher"),
        (["--method", "uniform", "--flops-target", "0.05", "--max-stage-prune", "0.1,0.1,0.1"], "impossible"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("rayprune: error: ") and needle in err, (extra, err)
    assert not (tmp_path / "o" / "final").exists()  # nothing half-written


@pytest.mark.slow  # full `rayprune run`s
def test_run_writes_result_and_resumes_without_duplicates(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "--method",
        "random",
        "--smoke",
        "--model",
        "cifar_resnet:tiny",
        "--dataset",
        "synthetic",
        "--flops-target",
        "0.5",
        "--finetune",
        "epochs=1",
        "--out",
        str(out),
        "--json",
    ]
    assert main([*args, "--max-steps", "1"]) == 0
    first = [json.loads(line) for line in (out / "subnets.jsonl").read_text().splitlines()]
    assert main(args) == 0  # resumes from state.pt and finishes the search
    rows = [json.loads(line) for line in (out / "subnets.jsonl").read_text().splitlines()]
    keys = [(r["step"], models.spec_hash(r["spec"])) for r in rows]
    assert len(keys) == len(set(keys)) and rows[: len(first)] == first and len(rows) > len(first)
    result = json.loads((out / "result.json").read_text())
    assert result["num_subnets"] == len(rows)
    final = result["final"]
    assert final["macs"] == models.macs(final["spec"], 32) <= 0.5 * result["unpruned_macs"]
    from rayprune.runner import load_subnet

    spec, _net = load_subnet(out / "final")
    assert spec == final["spec"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["macs"] == final["macs"] and 0.0 <= summary["test_top1"] <= 1.0
    # Resuming that state under another budget would mix two searches: refused, naming the field.
    changed = [a if a != "0.5" else "0.4" for a in args]
    assert main(changed) != 0
    err = capsys.readouterr().err
    assert err.startswith("rayprune: error: ") and "flops_target" in err and "--no-resume" in err
    assert json.loads((out / "config.json").read_text())["flops_target"] == 0.5


@pytest.mark.slow  # full `rayprune run`s
def test_run_output_for_people_and_for_programs(tmp_path, capsys):
    """Human mode: a line per step and the summary table beside the unpruned net; --json: one
    schema of scalar values (l1 used to print a list of MACs where ast printed a float)."""
    from rayprune.runner import step_label

    base = [
        "run",
        "--model",
        "cifar_resnet:tiny",
        "--dataset",
        "synthetic",
        "--flops-target",
        "0.5",
        "--finetune",
        "epochs=1",
        "--smoke",
    ]
    assert main([*base, "--method", "l1", "--shortcut", "avgpool_conv", "--out", str(tmp_path / "l1"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"] for r in rows] == ["step", "result"]
    assert all(isinstance(v, (int, float, str)) or v is None for r in rows for v in r.values())
    result = json.loads((tmp_path / "l1" / "result.json").read_text())
    assert rows[-1]["macs"] == result["final"]["macs"] and rows[-1]["unpruned_macs"] == result["unpruned_macs"]
    assert rows[-1]["macs_ratio"] == pytest.approx(result["final"]["macs"] / result["unpruned_macs"])

    assert main([*base, "--method", "random", "--out", str(tmp_path / "random")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["search step 1", "search step 2"]
    final = json.loads((tmp_path / "random" / "result.json").read_text())["final"]
    header = next(
        i
        for i, line in enumerate(lines)
        if line.split() == ["MACs", "MACs%", "params", "val_top1", "test_top1", "robust_top1"]
    )
    unpruned, mine = lines[header + 1].split(), lines[header + 2].split()
    assert unpruned[:3] == ["unpruned", f"{models.macs(models.full_spec('cifar_resnet:tiny'), 32):,}", "100.0"]
    assert mine[:3] == ["random", "subnet", f"{final['macs']:,}"]
    assert mine[-2] == f"{final['metrics']['test_top1']:.4f}"

    class Planned:
        planned_steps = 14

    class Unknown:
        planned_steps = None

    assert step_label(Planned(), 2) == "search step 3/14" and step_label(Unknown(), 0) == "search step 1"


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["run", "--method", "uniform", "--model", "cifar_resnet:tiny", "--flops-target", "half", "--out", "o"],
            "argument --flops-target: invalid float value: 'half' (see rayprune run --help)",
        ),
        (["sweep"], "the following arguments are required: --space (see rayprune sweep --help)"),
        (
            ["teacher", "--model", "cifar_resnet:tiny", "--epochs", "0", "--out", "t"],
            "argument --epochs: expected a positive whole number, got '0' (see rayprune teacher --help)",
        ),
        (["inspect"], "the following arguments are required: spec (see rayprune inspect --help)"),
        (["frnt"], "argument command: invalid choice: 'frnt'"),
    ],
)
def test_argparse_errors_are_one_line_for_every_command(tmp_path, monkeypatch, capsys, argv, line):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"rayprune: error: {line}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_is_one_line_saying_it_is_a_bug(tmp_path, monkeypatch, capsys):
    import rayprune.cli as cli

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    monkeypatch.delenv("RAYPRUNE_DEBUG", raising=False)
    assert main(["inspect", "x.json"]) == 1
    assert capsys.readouterr().err == (
        "rayprune: error: internal error, a bug in rayprune (KeyError: 'internal'); "
        "rerun with RAYPRUNE_DEBUG=1 to see the traceback, and report it\n"
    )
    monkeypatch.setenv("RAYPRUNE_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["inspect", "x.json"])


@pytest.mark.parametrize("command", ["run", "teacher"])
def test_the_help_lists_the_registered_methods_and_datasets(capsys, command):
    from rayprune.engine.data import DATASETS
    from rayprune.methods import MODULES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "|".join(DATASETS) in help_text
    assert ("|".join(MODULES) in help_text) == (command == "run")
