"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

A filter's importance is the L1 norm of its weights in the trained unpruned net (ctx.teacher,
else a short pre-training). Unlike the paper's per-layer sensitivity analysis, channels are
ranked *globally* (scores normalised by their layer mean, averaged over a channel group's
producers) and the least important are dropped until the FLOPs target is met; the subnet
inherits the surviving weights and is fine-tuned by the shared engine. The budget: the per-stage
maximum rates are hard floors; a budget ``allocation`` fixes how much each stage is pruned, and
the L1 ranking then picks the channels within each stage. See
:class:`rayprune.methods._baseline.RankedPruning` for the steps, the budget and the hyperparameters.
"""

from __future__ import annotations

from ._baseline import RankedPruning, l1_scores


class L1Pruning(RankedPruning):
    """Global L1-norm channel ranking under the FLOPs budget, weights inherited."""

    name = "l1"
    score = staticmethod(l1_scores)
