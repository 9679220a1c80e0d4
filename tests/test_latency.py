"""Latency you can trust: the typed record, the interleaved measurement the sweep runs alone on
one node, the node it picks, the store and MLflow carrying the record, and `front`'s spread flag."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rayprune import models
from rayprune.engine import latency as latency_mod
from rayprune.engine.latency import LatencyRecord, measure_interleaved, records_from, split_calls
from rayprune.methods import SubnetRecord
from rayprune.orchestration.cache import FinalCache, cache_key
from rayprune.orchestration.isolated_latency import LatencyNodeError, as_update, measure_entries, pick_node
from rayprune.tracking.pareto import LATENCY_LEGEND, format_baseline, format_table, within_spread


def quarter_width(spec: dict) -> dict:
    """``spec`` with every width halved: about a quarter of its MACs."""
    half = copy.deepcopy(spec)
    half["stem"] = spec["stem"] // 2
    half["stages"] = [[[w // 2 for w in block] for block in stage] for stage in spec["stages"]]
    return half


def test_a_quarter_of_the_macs_measures_at_least_1_3x_faster_at_batch_64(tmp_path):
    """cifar_resnet:20 and its 25 %-MACs subnet, cached as the sweep caches its finalists, timed
    by the sweep's own measurement (interleaved passes, medians) at 32x32. Threads pinned to one:
    the suite shares the cores with other work, and a thread that waits for a busy core stalls
    every op of a multi-threaded call (the sweep's task holds its node's CPUs and pins that many)."""
    full = models.full_spec("cifar_resnet:20")
    sub = quarter_width(full)
    assert models.macs(sub, 32) / models.macs(full, 32) == pytest.approx(0.25, abs=0.005)
    cache = FinalCache(str(tmp_path / "final_cache"))
    keys = []
    for name, spec in (("baseline", full), ("cell", sub)):
        key = cache_key(name, models.spec_hash(spec), "r", 0.0)
        record = SubnetRecord.of(spec, {"test_top1": 0.5}, "uniform", 0, 32).to_dict()
        cache.put(key, record, models.build(spec, seed=0).state_dict())
        keys.append(key)
    measured = measure_entries(cache, keys, (3, 32, 32), threads=1, batch_sizes=(64,), calls=5)
    base, pruned = (as_update(measured[k])["metrics"]["latency_ms_b64_p50"] for k in keys)
    assert base / pruned >= 1.3, f"unpruned {base:.1f} ms, 25 % MACs {pruned:.1f} ms at batch 64"
    (record,) = measured[keys[1]]
    assert (record.backend, record.device, record.batch, record.passes, record.repeats) == ("torch", "cpu", 64, 5, 1)
    assert record.threads == 1 and record.spread_ms >= 0


def test_the_record_round_trips_through_metrics_and_setting():
    records = [LatencyRecord("torch", "cpu", b, 4, 1.5 * b, 2.0 * b, 0.25, 5, 4, "node-a (10.0.0.2)") for b in (1, 64)]
    metrics, setting = latency_mod.latency_metrics(records), latency_mod.latency_setting(records)
    assert metrics == {
        "latency_ms_b1_p50": 1.5,
        "latency_ms_b1_p90": 2.0,
        "latency_ms_b1_spread": 0.25,
        "latency_ms_b64_p50": 96.0,
        "latency_ms_b64_p90": 128.0,
        "latency_ms_b64_spread": 0.25,
    }
    assert setting == {
        "backend": "torch",
        "device": "cpu",
        "threads": 4,
        "passes": 5,
        "repeats": 4,
        "node": "node-a (10.0.0.2)",
        "batches": [1, 64],
    }
    assert records_from(metrics, setting) == records and records_from(metrics, {}) == []
    assert split_calls(20) == (5, 4) and split_calls(3) == (3, 1) and split_calls(7) == (5, 2)


class Counting(nn.Module):
    """Counts its calls and the thread count torch had during them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.calls = 0
        self.threads: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.threads.add(torch.get_num_threads())
        return self.conv(x)


def test_interleaved_measurement_pins_threads_and_times_every_net_per_pass():
    nets = {"a": Counting(), "b": Counting().train(False)}
    before, state = torch.get_num_threads(), torch.random.get_rng_state()
    out = measure_interleaved(
        nets, (3, 8, 8), batch_sizes=(1, 4), passes=3, repeats=2, warmup=1, threads=1, node="here"
    )
    assert torch.get_num_threads() == before and torch.equal(torch.random.get_rng_state(), state)
    assert [n.calls for n in nets.values()] == [2 * (1 + 3 * 2)] * 2 and all(n.threads == {1} for n in nets.values())
    assert nets["a"].training and not nets["b"].training  # train mode restored
    for records in out.values():
        assert [r.batch for r in records] == [1, 4]
        assert all(r.node == "here" and r.threads == 1 and 0 < r.median_ms <= r.p90_ms for r in records)
    with pytest.raises(ValueError, match="passes and repeats must be >= 1"):
        measure_interleaved(nets, (3, 8, 8), passes=0)


def node(node_id: str, cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_the_measurement_goes_to_the_alive_node_with_the_most_cpus():
    nodes = [node("h", 0), node("b", 8), node("a", 8), node("c", 16, alive=False), node("g", 4, gpus=1)]
    assert pick_node(nodes, gpu=False) == ("a", 8)  # ties: the smaller id
    assert pick_node(nodes, gpu=True) == ("g", 4)
    with pytest.raises(LatencyNodeError, match="no alive Ray node has a GPU and a CPU to measure latency on"):
        pick_node([node("a", 8)], gpu=True)


def row(kind: str, latency: float | None, spread: float | None) -> dict:
    metrics = {"test_top1": 0.9}
    if latency is not None:
        metrics["latency_ms_b1_p50"] = latency
    if spread is not None:
        metrics["latency_ms_b1_spread"] = spread
    return {
        "trial_id": kind,
        "kind": kind,
        "method": "l1",
        "flops_target": 0.5,
        "kd_weight": 0.0,
        "macs": 100,
        "params": 10,
        "metrics": metrics,
        "source": {},
    }


def test_front_marks_a_latency_within_its_spread_of_the_baseline():
    base = row("unpruned", 1.0, 0.05)
    noisy, clear, unknown = row("finetuned", 1.1, 0.2), row("finetuned", 0.5, 0.1), row("finetuned", 0.5, None)
    assert [within_spread(r, base) for r in (noisy, clear, unknown, base)] == [True, False, False, False]
    assert not within_spread(noisy, None)
    table = format_table([noisy, clear], baseline=base).splitlines()
    assert table[-1] == LATENCY_LEGEND and LATENCY_LEGEND.startswith("~ after a latency: its spread")
    assert table[1].endswith("1.0000") and table[2].endswith("1.1000~") and table[3].endswith("0.5000")
    assert LATENCY_LEGEND not in format_table([clear], baseline=base)
    base["source"] = {"latency": {"node": "vm (10.0.0.9)", "threads": 2}}
    assert format_baseline([base, clear]).endswith("latency 1.000 ms (batch 1, on vm (10.0.0.9) with 2 threads)")


class Runs:
    """What the tracker writes to MLflow, recorded (the sweep test checks the real runs)."""

    parent = "parent-run"

    def __init__(self) -> None:
        self.metrics: dict[str, dict[str, float]] = {}
        self.params: dict[str, dict[str, str]] = {}
        self.client = self

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(run_id, {}).update(metrics)

    def log_new_params(self, run_id: str, params: dict[str, str], logged: dict[str, str]) -> None:
        self.params.setdefault(run_id, {}).update({k: v for k, v in params.items() if k not in logged})

    def get_run(self, run_id: str) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(params=self.params.get(run_id, {})))


def test_the_store_and_the_runs_carry_the_isolated_measurement(tmp_path):
    """The tracker puts a re-measured latency in place of the first one: the store row (and the
    Parquet file), the fine-tuned cell's run (metrics, latency_ms, latency.* params), the parent run."""
    from rayprune.tracking.mlflow_tracker import SweepTracker
    from rayprune.tracking.store import SubnetStore, record_row

    full = models.full_spec("cifar_resnet:20")
    unpruned = SubnetRecord.of(full, {"test_top1": 0.9}, "unpruned", 0, 32).to_dict()
    base = record_row(unpruned, trial_id="unpruned", kind="unpruned")
    stale = {"test_top1": 0.8, "latency_ms_b1_p50": 9.0, "latency_ms_b1_p90": 9.5}
    tuned = SubnetRecord.of(quarter_width(full), stale, "l1", 3, 32).to_dict()
    tuned["source"] = {"latency_shared_gpu": 0.25, "cache_key": "cell/k"}
    cell = record_row(tuned, trial_id="t1", kind="finetuned", run_id="cell-run", flops_target=0.25, kd_weight=0.0)
    tracker = SweepTracker.__new__(SweepTracker)  # no MLflow store: its writes go to Runs
    tracker.store, tracker.runs = SubnetStore(tmp_path / "subnets.parquet", compact_every_s=30.0), Runs()
    tracker.store.add([base, cell])
    tracker.runs.sweep_id = "s"
    tracker.runs.parent_run_id = "parent-run"
    records = {
        name: [LatencyRecord("torch", "cpu", b, 2, ms * b, ms * b + 1, 0.1, 5, 4, "vm (10.0.0.9)") for b in (1, 64)]
        for name, ms in (("unpruned", 2.0), ("finetuned", 0.5))
    }
    for row in (base, cell):
        update = as_update(records[row["kind"]])
        tracker.log_latency(row, update["metrics"], update["latency"])

    stored = {r["kind"]: r for r in SubnetStore(tmp_path / "subnets.parquet").rows()}
    for kind in ("unpruned", "finetuned"):
        assert records_from(stored[kind]["metrics"], stored[kind]["source"]["latency"]) == records[kind]
    assert stored["finetuned"]["metrics"]["test_top1"] == 0.8 and stored["finetuned"]["source"] == {
        "cache_key": "cell/k",
        "latency": latency_mod.latency_setting(records["finetuned"]),
    }
    assert tracker.runs.metrics["cell-run"] == {**latency_mod.latency_metrics(records["finetuned"]), "latency_ms": 0.5}
    assert tracker.runs.metrics["parent-run"] == {
        f"unpruned_{k}": v for k, v in latency_mod.latency_metrics(records["unpruned"]).items()
    }
    params = {
        "latency.backend": "torch",
        "latency.device": "cpu",
        "latency.threads": "2",
        "latency.passes": "5",
        "latency.repeats": "4",
        "latency.node": "vm (10.0.0.9)",
        "latency.batches": "[1, 64]",
    }
    assert tracker.runs.params == {"cell-run": params, "parent-run": params}
