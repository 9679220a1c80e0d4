"""A trial's final phase, without Tune: train the chosen subnet with the sweep's search recipe
through the sweep's :class:`~.cache.FinalCache`, and flag latency measured on a shared GPU.

The trainable (:mod:`.trainable`), the unpruned baseline task (:mod:`.baseline`) and the cell
fine-tunes (:mod:`.cell_finetune`) use it. It imports neither Ray Tune nor Optuna: a Ray task
worker that runs a baseline or a fine-tune loads only torch, Ray's core and rayprune.
"""

from __future__ import annotations

import ray
import torch

from ..grid import CellKey
from ..methods import Method, SubnetRecord
from ..methods.finetune import finetune_config, finetune_subnet, recipe_hash, recipe_of
from .cache import FinalCache, cache_key


def final_phase(
    method: Method,
    cache: FinalCache | None,
    cell: CellKey | str,
    owner: str,
    record: SubnetRecord | None = None,
    progress: bool = False,
) -> tuple[SubnetRecord, dict[str, torch.Tensor]]:
    """Train ``record`` (default: the method's chosen subnet) with the context's fine-tune
    recipe, as :func:`~rayprune.methods.finetune.finalize` does, unless ``cache`` already holds that training for
    ``cell`` (same spec, recipe and KD weight): then return the cached record, marked
    ``source["reused_from"]`` (the trial or task that trained it), and its weights. A new
    training is stored in the cache, marked ``source["trained_by"] = owner``."""
    record = record if record is not None else method.best()
    recipe = recipe_of(finetune_config(method.ctx))
    key = cache_key(cell, record.key, recipe_hash(recipe), method.ctx.kd_weight)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        saved, state = cached
        source = {**saved["source"], "reused_from": saved["source"].get("trained_by"), "cache_key": key}
        return SubnetRecord.from_dict({**saved, "source": source}), state
    final = finetune_subnet(record, method.ctx, method.initial_weights(record), progress=progress)
    final.record.source.update(trained_by=owner, cache_key=key)
    flag_shared_gpu(final.record)
    if cache is not None:
        cache.put(key, final.record.to_dict(), final.state_dict)
    return final.record, final.state_dict


def flag_shared_gpu(record: SubnetRecord) -> None:
    """Mark ``record``'s latency as measured on a shared GPU (``source.latency_shared_gpu``, the
    share) when this trial or task holds a fraction of one: the other tenants skew it."""
    share = shared_gpu_share()
    if share is not None and any(k.startswith("latency") for k in record.metrics):
        record.source["latency_shared_gpu"] = share


def shared_gpu_share() -> float | None:
    """The GPU share Ray gave this trial or task when it is a fraction of one GPU (others then
    run on the same device, so latency measured here is skewed), else None."""
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None  # no Ray, or a driver (which holds no resources): the process has the device to itself
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return float(share) if 0.0 < share < 1.0 else None


__all__ = ["final_phase", "flag_shared_gpu", "shared_gpu_share"]
