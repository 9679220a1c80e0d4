"""Latency you can compare: every candidate and the baseline timed together, alone on one node.

Latency measured inside the fine-tunes shares the cores with the other fine-tunes, so it ranks
nets by how busy the machine was. Instead, once every fine-tune is done, :func:`measure_finalists`
runs one Ray task that reserves every CPU of one node (and a whole GPU when the sweep trains on
GPUs) and times the unpruned baseline and each candidate in turn on that node, interleaved
(:func:`~rayprune.engine.latency.measure_interleaved`: passes over all nets, medians, threads
pinned to the reserved CPUs). Each record then carries ``latency_ms_b<B>_p50`` / ``_p90`` /
``_spread`` in its metrics and the setting (backend, device, threads, node, passes, repeats,
batch sizes) in ``source["latency"]``; the tracker writes them to the subnet store and MLflow.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import models
from ..engine import latency as latency_mod
from ..engine.data import DATASETS
from ..errors import RaypruneError
from .cache import FinalCache
from .config import SweepConfig

if TYPE_CHECKING:
    from ..tracking import SweepTracker

#: Batch sizes and timed calls per net and batch size: what a subnet's own measurement uses.
BATCH_SIZES = (1, 64)
CALLS = 20


class LatencyNodeError(RaypruneError):
    """No node of the cluster can hold the latency measurement."""


def measure_entries(
    cache: FinalCache,
    keys: Sequence[str],
    input_shape: Sequence[int],
    *,
    device: str = "cpu",
    threads: int | None = None,
    node: str | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    calls: int = CALLS,
) -> dict[str, list[latency_mod.LatencyRecord]]:
    """Time the cached trainings ``keys`` (their spec and weights) interleaved, in this process:
    the measurement of the isolated task, and of anything that wants the sweep's numbers."""
    nets = {}
    for key in keys:
        entry = cache.get(key)
        if entry is None:
            raise KeyError(f"no final-phase training {key!r} in the cache at {cache.root}")
        record, state = entry
        net = models.build(record["spec"])
        net.load_state_dict(state)
        nets[key] = net
    passes, repeats = latency_mod.split_calls(calls)
    return latency_mod.measure_interleaved(
        nets,
        input_shape,
        device=device,
        batch_sizes=batch_sizes,
        passes=passes,
        repeats=repeats,
        threads=threads,
        node=node,
    )


def _measure_task(
    cache_root: str, keys: list[str], input_shape: list[int], device: str, threads: int
) -> dict[str, dict[str, Any]]:
    """Ray task body: :func:`measure_entries` on the node Ray placed it on, named in the records."""
    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    records = measure_entries(FinalCache(cache_root), keys, input_shape, device=device, threads=threads, node=node)
    return {key: as_update(recs) for key, recs in records.items()}


def as_update(records: Sequence[latency_mod.LatencyRecord]) -> dict[str, Any]:
    """What a subnet record takes from its latency records: ``metrics`` and ``source["latency"]``."""
    return {"metrics": latency_mod.latency_metrics(records), "latency": latency_mod.latency_setting(records)}


def pick_node(nodes: Sequence[Mapping[str, Any]], gpu: bool) -> tuple[str, int]:
    """``(node id, CPUs)`` of the alive node with the most CPUs (with a GPU when ``gpu``); ties
    go to the smaller node id, so the same cluster always gives the same node."""
    usable = [
        n
        for n in nodes
        if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1 and (not gpu or n["Resources"].get("GPU", 0))
    ]
    if not usable:
        what = "a GPU and a CPU" if gpu else "a CPU"
        raise LatencyNodeError(
            f"no alive Ray node has {what} to measure latency on", fix="add a node, then run again with --resume"
        )
    best = min(usable, key=lambda n: (-n["Resources"]["CPU"], n["NodeID"]))
    return str(best["NodeID"]), int(best["Resources"]["CPU"])


def input_shape_of(cfg: SweepConfig, records: Sequence[Mapping[str, Any]]) -> list[int]:
    """``(C, H, W)`` the nets were tested at: the records' preprocessing, else the sweep's input
    size (or the dataset's) with 3 channels (the engine's datasets are RGB)."""
    for record in records:
        pre = (record.get("source") or {}).get("preprocessing")
        if pre:
            return [int(pre["channels"]), int(pre["input_size"]), int(pre["input_size"])]
    size = int(cfg.input_size or DATASETS.get(cfg.dataset.name).input_size)
    return [3, size, size]


def _finalists(tracker: SweepTracker, baseline_key: str) -> dict[str, list[dict[str, Any]]]:
    """cache key -> the store rows it measures: the unpruned baseline and every fine-tuned cell."""
    by_key: dict[str, list[dict[str, Any]]] = {baseline_key: tracker.store.rows(("unpruned",))}
    for row in tracker.store.rows(("finetuned",)):
        key = row["source"].get("cache_key")
        if key:
            by_key.setdefault(key, []).append(row)
    return by_key


def measure_finalists(cfg: SweepConfig, tracker: SweepTracker, experiment_path: str, baseline_key: str) -> None:
    """Time the baseline and every candidate in one Ray task alone on one node (see the module
    docstring), and record the numbers in the store and MLflow (:meth:`SweepTracker.log_latency`)."""
    by_key = _finalists(tracker, baseline_key)
    cache = FinalCache.of_experiment(experiment_path)
    keys = [k for k in by_key if k in cache]
    gpu = cfg.resources.gpu > 0
    node_id, cpus = pick_node(ray.nodes(), gpu)
    shape = input_shape_of(cfg, [r for rows in by_key.values() for r in rows])
    print(
        f"Measuring latency in isolation: the baseline and {len(keys) - 1} candidate(s), interleaved, on one node "
        f"holding all its {cpus} CPUs{' and a GPU' if gpu else ''} ...",
        flush=True,
    )
    task = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0)(_measure_task).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    device = cfg.device or ("cuda" if gpu else "cpu")
    updates = ray.get(task.remote(cache.root, keys, shape, device, cpus))
    for key, update in updates.items():
        for row in by_key[key]:
            tracker.log_latency(row, update["metrics"], update["latency"])


__all__ = ["BATCH_SIZES", "CALLS", "LatencyNodeError", "as_update", "measure_entries", "measure_finalists", "pick_node"]
