"""FPGM: filter pruning via geometric median (He et al., CVPR 2019).

Per layer, a filter's importance is the sum of its Euclidean distances to the layer's other
filters: filters close to the geometric median can be represented by the rest and go first.
The paper prunes a fixed fraction per layer with soft (re-growable) pruning during training;
here, like :mod:`rayprune.methods.l1`, channels are ranked *globally* (layer-mean normalised)
and pruned hard once from the trained net to meet the FLOPs target, then fine-tuned from the
inherited weights. The budget: the per-stage maximum rates are hard floors; a budget ``allocation``
fixes how much each stage is pruned, and the FPGM ranking then picks the channels within each
stage. See :class:`rayprune.methods._baseline.RankedPruning`.
"""

from __future__ import annotations

from ._baseline import RankedPruning, fpgm_scores


class FPGMPruning(RankedPruning):
    """Global geometric-median channel ranking under the FLOPs budget, weights inherited."""

    name = "fpgm"
    score = staticmethod(fpgm_scores)
