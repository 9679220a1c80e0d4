"""The sweep's one final-phase cache: a subnet is trained once per (cell, spec, recipe, KD weight)."""

from __future__ import annotations

import pytest
import torch

from rayprune.grid import CellKey
from rayprune.methods.finetune import finetune_config, recipe_hash, recipe_of
from rayprune.orchestration import final_phase as final_phase_module
from rayprune.orchestration.cache import FinalCache, cache_key
from rayprune.runner import TrialConfig, build_method

pytestmark = pytest.mark.slow  # every test here runs a Ray sweep or Ray tasks


def uniform(tmp_path, seed, rates, epochs=1):
    cfg = TrialConfig(
        method="uniform",
        model="cifar_resnet:tiny",
        shortcut="avgpool_conv",
        dataset="synthetic",
        flops_target=0.5,
        max_stage_prune=rates,
        seed=seed,
        robust=False,
        measure_latency=False,
        finetune={"epochs": epochs, "batch_size": 64},
        hparams={"eval_epochs": 1},
        train_subset=200,
        test_subset=100,
    )
    method = build_method(cfg, tmp_path / f"m{seed}")
    method.step()
    return method


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = final_phase_module.finetune_subnet

    def counting(record, ctx, init_state=None, progress=None):
        calls.append(record.key)
        return real(record, ctx, init_state, progress=progress)

    monkeypatch.setattr(final_phase_module, "finetune_subnet", counting)
    return calls


def test_duplicate_specs_in_a_cell_are_trained_once(tmp_path, counted):
    cache = FinalCache(str(tmp_path / "cache"))
    cell = CellKey("uniform", 0.5, 0.0)
    # three trials of one cell under different budgets; the budgets do not bind, so one subnet
    methods = [uniform(tmp_path, seed, rates) for seed, rates in enumerate([[0.7] * 3, [0.75] * 3, [0.8] * 3])]
    assert len({m.best().key for m in methods}) == 1
    results = [final_phase_module.final_phase(m, cache, cell, f"t{i}") for i, m in enumerate(methods)]
    assert counted == [methods[0].best().key]  # trained once ...
    first, *again = results
    assert first[0].source["trained_by"] == "t0" and "reused_from" not in first[0].source
    for record, state in again:  # ... reused twice, with the same numbers and weights
        assert record.source["reused_from"] == "t0" and record.metrics == first[0].metrics
        assert all(torch.equal(state[k], first[1][k]) for k in first[1])
    recipe = recipe_of(finetune_config(methods[0].ctx))
    key = cache_key(cell, methods[0].best().key, recipe_hash(recipe), 0.0)
    assert cache.keys() == [key] and first[0].source["cache_key"] == key
    assert first[0].source["recipe"] == recipe and first[0].source["recipe_tag"] == "e1 cosine lr0.1 bs64 kd0"
    assert first[0].source["init"] == "scratch" and first[0].source["robust_suite"] is None


def test_another_recipe_or_cell_is_another_training(tmp_path, counted):
    cache = FinalCache(str(tmp_path / "cache"))
    a = uniform(tmp_path, 0, [0.7] * 3)
    longer = uniform(tmp_path, 1, [0.7] * 3, epochs=2)
    final_phase_module.final_phase(a, cache, CellKey("uniform", 0.5, 0.0), "t0")
    final_phase_module.final_phase(longer, cache, CellKey("uniform", 0.5, 0.0), "t1")  # other recipe
    final_phase_module.final_phase(a, cache, CellKey("uniform", 0.6, 0.0), "t2")  # other cell
    assert len(counted) == 3 and len(cache.keys()) == 3
