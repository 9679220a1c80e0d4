"""rayprune: find pruned CNNs that keep their accuracy at a fraction of the FLOPs.

Layers (imports only go downward):

* ``rayprune.models``   -- families, spec <-> nn.Module, analytic MACs/params, weight transfer
* ``rayprune.engine``   -- data, fit/evaluate, KD, robust accuracy, latency, checkpoints
* ``rayprune.methods``  -- ast, tas, sp, uniform, l1, fpgm, random (one file each, one interface)
* ``rayprune.tracking`` / ``rayprune.orchestration`` -- MLflow/Parquet/Pareto and Ray Tune/Optuna

Everything from ``methods`` down is pure torch.
"""

__version__ = "0.1.0"
