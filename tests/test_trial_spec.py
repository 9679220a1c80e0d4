"""The typed trial spec: what the sweep driver hands a Tune trial, parsed once from Tune's config dict."""

from __future__ import annotations

import pytest

from rayprune.grid import CellKey
from rayprune.orchestration.config import Cell
from rayprune.orchestration.trial_spec import TrialSpec, sample_config, shared_config

BASE = {"model": "cifar_resnet:tiny", "dataset": "synthetic", "seed": 7, "finetune": {"epochs": 1}}
HPARAMS = {"uniform": {"eval_epochs": 2}, "l1": {}}


def config(**sample) -> dict:
    parts = {"cell_index": 3, "cell": CellKey("uniform", 0.5, 0.9), "max_stage_prune": [0.1, 0.2, 0.3]}
    parts.update(sample)
    return {**shared_config(BASE, HPARAMS, 2.0, "/runs/x/final_cache"), **sample_config(**parts, optuna_number=4)}


def test_the_wire_dict_keeps_its_keys_and_values():
    assert config() == {
        "base": BASE,
        "hparams": HPARAMS,
        "cpus_per_trial": 2.0,
        "final_cache": "/runs/x/final_cache",
        "cell": 3,
        "method": "uniform",
        "flops_target": 0.5,
        "kd_weight": 0.9,
        "max_stage_prune": [0.1, 0.2, 0.3],
        "optuna_number": 4,
    }


def test_a_config_parses_into_attributes():
    spec = TrialSpec.from_config(config())
    assert (spec.cell_index, spec.method, spec.flops_target, spec.kd_weight) == (3, "uniform", 0.5, 0.9)
    assert spec.max_stage_prune == (0.1, 0.2, 0.3) and spec.optuna_number == 4
    assert (spec.cpus_per_trial, spec.final_cache) == (2.0, "/runs/x/final_cache")
    assert spec.cell == CellKey("uniform", 0.5, 0.9) and str(spec.cell) == "uniform_f0.5_kd0.9"
    assert spec.seed == 11  # the sweep's seed offset by the Optuna trial number
    assert spec.method_hparams == {"eval_epochs": 2}


def test_the_trial_config_is_the_method_run():
    cfg = TrialSpec.from_config(config()).trial_config()
    assert (cfg.method, cfg.model, cfg.dataset, cfg.seed) == ("uniform", "cifar_resnet:tiny", "synthetic", 11)
    assert (cfg.flops_target, cfg.kd_weight, cfg.max_stage_prune) == (0.5, 0.9, [0.1, 0.2, 0.3])
    assert cfg.hparams == {"eval_epochs": 2} and cfg.finetune == {"epochs": 1}
    other = TrialSpec.from_config(config(cell=CellKey("l1", 0.5, 0.9))).trial_config()
    assert other.hparams == {}


def test_an_allocation_travels_to_the_method_run():
    wire = config(cell=CellKey("l1", 0.5, 0.0), allocation=[0.5, 0.25, 0.25])
    assert wire["allocation"] == [0.5, 0.25, 0.25] and "allocation" not in config()
    spec = TrialSpec.from_config(wire)
    assert spec.allocation == (0.5, 0.25, 0.25) and spec.trial_config().allocation == [0.5, 0.25, 0.25]
    assert TrialSpec.from_config(config()).allocation is None  # a config without one: the old behaviour
    assert TrialSpec.from_config(config()).trial_config().allocation is None


def test_a_config_saved_without_the_optional_keys_still_parses():
    old = {k: v for k, v in config().items() if k not in ("cpus_per_trial", "final_cache")}
    spec = TrialSpec.from_config(old)
    assert (spec.cpus_per_trial, spec.final_cache) == (1.0, None)


def test_a_config_missing_its_cell_is_refused():
    broken = {k: v for k, v in config().items() if k != "cell"}
    with pytest.raises(KeyError, match="cell"):
        TrialSpec.from_config(broken)


def test_a_grid_cell_and_its_key_name_it_once():
    cell = Cell("ast", 0.5, 0.0)
    assert cell.key == CellKey("ast", 0.5, 0.0) and str(cell.key) == "ast_f0.5_kd0"
