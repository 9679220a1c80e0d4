"""AST's calibration and convergence: how a subnet is drawn to the FLOPs target, and when the
search has settled (AST / ThreshNet, Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023).

**Calibration.** Per channel group, the channels are ranked by ``softmax(α + s_t·Gumbel)``
(:func:`rank_channels`) and counted until their mass reaches the group's threshold τ_l
(:func:`soft_mass_count`). One global factor, found by bisection, scales every count so that
the subnet lands in ``[window·target, target]`` MACs, never below the budget's per-group floor
(:func:`calibrate_to_target`); each group keeps its most probable channels.

**Convergence.** After each iteration AST's *deterministic* subnet (greedy τ, no noise, same
calibration) is compared with the previous iteration's, group by group, weighted by the MACs
each group carries (:class:`ConvergenceTracker`); the search stops once it stays the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import models
from ..models.axis_expr import groups_in
from ..models.base import Spec, SpecError
from ..models.tiles import per_block_prefix

Keep = dict[str, torch.Tensor]  # channel group -> sorted kept indices (LongTensor)

MASS_EPS = 1e-9  # cumulative mass compares against τ − MASS_EPS, so float round-off never adds a channel
CALIBRATION_STEPS = 40  # bisection steps on the global width scale (far below any one-channel change)

# --------------------------------------------------------------------------------------------
# Calibration: drawing a subnet to the FLOPs target
# --------------------------------------------------------------------------------------------


def gumbel_noise(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` i.i.d. Gumbel(0, 1) samples drawn from ``gen`` only."""
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp_(1e-12, 1.0 - 1e-12)
    return -torch.log(-torch.log(u))


def mass_count(sorted_probs: torch.Tensor, tau: float) -> int:
    """How many of the (descending) ``sorted_probs`` it takes for their mass to reach ``tau``."""
    mass = torch.cumsum(sorted_probs.double(), 0)
    return min(sorted_probs.numel(), int((mass < tau - MASS_EPS).sum()) + 1)


def mass_threshold_keep(probs: torch.Tensor, tau: float, min_keep: int = 1, divisor: int = 1) -> torch.Tensor:
    """Kept channel indices (ascending) of one group: the fewest highest-probability channels
    whose cumulative mass reaches ``tau``, raised to ``min_keep`` and to a multiple of ``divisor``
    (capped at the group's width).

    >>> mass_threshold_keep(torch.full((16,), 1 / 16), 0.6).numel()
    10
    """
    order = torch.argsort(probs, descending=True, stable=True)
    n = max(mass_count(probs[order], tau), min_keep)
    n = min(probs.numel(), math.ceil(n / divisor) * divisor)
    return order[:n].sort().values


def soft_mass_count(sorted_probs: torch.Tensor, tau: float) -> float:
    """:func:`mass_count` made continuous: whole channels up to the one that crosses ``tau``,
    plus the fraction of that channel's probability needed to reach it exactly. It moves
    smoothly as α changes, where the whole-channel count jumps."""
    mass = torch.cumsum(sorted_probs.double(), 0)
    whole = int((mass < tau - MASS_EPS).sum())
    if whole >= sorted_probs.numel():
        return float(sorted_probs.numel())
    before = float(mass[whole - 1]) if whole > 0 else 0.0
    return whole + max(0.0, min(1.0, (tau - before) / max(float(sorted_probs[whole]), 1e-300)))


@dataclass(frozen=True)
class GroupRanking:
    """One group's channels in keeping order, with their ``softmax(α + noise)`` probabilities."""

    order: torch.Tensor
    probs: torch.Tensor  # in ``order``


def rank_channels(
    alpha: Mapping[str, torch.Tensor],
    gen: torch.Generator | None,
    gumbel_scale: float,
    incumbent: Keep | None = None,
    margin: float = 0.0,
) -> dict[str, GroupRanking]:
    """Per group, the channel order by ``softmax(α + scale·Gumbel)``. Groups draw their noise in
    ``alpha``'s order, so the draw depends only on ``gen``'s state; scale 0 (or no generator)
    is the deterministic ranking by α.

    ``incumbent`` (the previous deterministic subnet) gets ``margin`` added to its channels'
    scores for the *order* only (the probabilities, hence the widths, are untouched): a channel
    displaces a kept one only when its α is higher by more than the margin. Without this
    hysteresis, channels of near-equal α at a group's boundary trade places at every draw and
    the subnet never settles although nothing of substance changes."""
    out = {}
    for g, a in alpha.items():
        logits = a.detach().double().cpu()
        if gumbel_scale > 0 and gen is not None:
            logits = logits + gumbel_scale * gumbel_noise(a.numel(), gen)
        probs = torch.softmax(logits, 0)
        score = logits.clone()
        if incumbent is not None and margin > 0:
            score[incumbent[g]] += margin
        order = torch.argsort(score, descending=True, stable=True)
        out[g] = GroupRanking(order, probs[order])
    return out


@dataclass(frozen=True)
class Calibrated:
    """A subnet drawn to the FLOPs target: its kept sets, MACs, the global width scale used, and
    whether the MACs landed in the window ``[window·target, target]``."""

    keep: dict[str, torch.Tensor]
    macs: int
    scale: float
    in_window: bool


def calibrate_to_target(
    spec: Spec,
    ranking: Mapping[str, GroupRanking],
    taus: Mapping[str, float],
    floors: Mapping[str, int],
    divisors: Mapping[str, int],
    target_macs: int,
    window: float,
    input_size: int | None = None,
    tiles: Mapping[str, int] | None = None,
) -> Calibrated:
    """Each group's width is its mass-threshold count ``m_l`` (the channels whose
    ``softmax(α)`` mass reaches τ_l, :func:`soft_mass_count`) times one global scale ``c``,
    clamped to ``[floor_l, width_l]``; ``c`` is found by bisection as the largest scale whose
    subnet still fits ``target_macs``. The channels kept are each group's most probable ones (of
    each block, for a group with ``tiles`` > 1: :func:`~rayprune.models.tiles.per_block_prefix`).

    So α (how peaked each group is, and which channels lead) and ThreshNet's τ_l set the
    *relative* widths, and ``c`` lands the subnet on the target instead of wherever the raw
    thresholds put it. Scaling counts, rather than shifting every τ by one offset, keeps the
    allocation stable once α is sharp: a shifted threshold then falls in each group's flat tail
    of near-equal tiny probabilities, where a small change of α moves many channels at once.
    Rounding leaves a little room under the target; it is filled one divisor step at a time, to
    the group whose scaled count was rounded down the most, while the subnet fits.
    """
    counts = {g: soft_mass_count(r.probs, taus[g]) for g, r in ranking.items()}

    def widths(c: float) -> dict[str, int]:
        out = {}
        for g, m in counts.items():
            d, full = divisors.get(g, 1), ranking[g].probs.numel()
            out[g] = min(full, max(floors[g], math.floor(c * m / d) * d))
        return out

    def cost(w: Mapping[str, int]) -> int:
        return models.macs(models.with_widths(spec, dict(w)), input_size)

    if cost(widths(0.0)) > target_macs:
        raise SpecError(
            f"cannot reach {target_macs} MACs even with every channel group at its floor; "
            f"raise flops_target or the per-stage pruning rates"
        )
    lo, hi = 0.0, max(ranking[g].probs.numel() / max(m, 1e-9) for g, m in counts.items())
    for _ in range(CALIBRATION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(widths(mid)) <= target_macs else (lo, mid)
    chosen = _fill_to_target(widths(lo), {g: lo * m for g, m in counts.items()}, ranking, divisors, target_macs, cost)
    macs = cost(chosen)
    tiles = tiles or {}
    keep = {g: per_block_prefix(r.order, chosen[g], r.order.numel(), tiles.get(g, 1)) for g, r in ranking.items()}
    return Calibrated(keep, macs, lo, macs >= window * target_macs)


def _fill_to_target(
    widths: dict[str, int],
    ideal: Mapping[str, float],
    ranking: Mapping[str, GroupRanking],
    divisors: Mapping[str, int],
    target_macs: int,
    cost: Callable[[Mapping[str, int]], int],
) -> dict[str, int]:
    """Grow ``widths`` one divisor step at a time, the group furthest below its ideal (scaled)
    count first, while the subnet fits ``target_macs``."""
    widths = dict(widths)
    while True:
        growable = [g for g in widths if widths[g] < ranking[g].probs.numel()]
        growable.sort(key=lambda g: widths[g] - ideal[g])
        for g in growable:
            trial = {**widths, g: min(ranking[g].probs.numel(), widths[g] + divisors.get(g, 1))}
            if cost(trial) <= target_macs:
                widths = trial
                break
        else:
            return widths


def group_macs(spec: Spec, input_size: int | None = None) -> dict[str, int]:
    """MACs attributed to each channel group: every conv/linear layer counts towards each group
    that indexes its weight (its output group and its input group)."""
    axes = models.tensor_axes(spec)
    out = {g.name: 0 for g in models.channel_groups(spec)}
    for layer in models.layers(spec, input_size):
        if layer.kind == "bn":
            continue
        for g in {g for a in axes[f"{layer.name}.weight"] for g in groups_in(a)}:
            out[g] += layer.macs
    return out


# --------------------------------------------------------------------------------------------
# Convergence
# --------------------------------------------------------------------------------------------


def group_similarity(a: torch.Tensor, b: torch.Tensor, divisor: int = 1) -> float:
    """Jaccard similarity of two kept sets, except that sets differing by at most one channel
    swap (a symmetric difference of ≤ 2 channels, or 2 divisors) count as identical: one
    channel trading places at the mass boundary is not a different architecture."""
    sa, sb = set(a.tolist()), set(b.tolist())
    if len(sa ^ sb) <= 2 * divisor:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class ConvergenceTracker:
    """The stop rule, judged on AST's *deterministic* subnet (greedy τ, no Gumbel noise).

    After each iteration the deterministic subnet is compared with the previous iteration's:
    its similarity is the MACs-weighted mean over channel groups of :func:`group_similarity`
    (weights: the MACs each group carries in the full net, so a swap in a 64-channel stage-3
    group counts for more than one in the stem). The search has converged once that similarity
    was ≥ ``min_similarity`` in ``patience`` consecutive iterations, and at least
    ``min_iterations`` iterations have run.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        divisors: Mapping[str, int],
        min_similarity: float = 0.9,
        patience: int = 3,
        min_iterations: int = 1,
    ) -> None:
        total = float(sum(weights.values())) or 1.0
        self.weights = {g: w / total for g, w in weights.items()}
        self.divisors = dict(divisors)
        self.min_similarity, self.patience, self.min_iterations = min_similarity, patience, min_iterations
        self.prev_keep: Keep | None = None
        self.streak = 0
        self.seen = 0

    def similarity(self, keep: Keep) -> float:
        """MACs-weighted similarity of ``keep`` to the previous deterministic subnet (0 before any)."""
        if self.prev_keep is None:
            return 0.0
        return sum(
            w * group_similarity(keep[g], self.prev_keep[g], self.divisors.get(g, 1)) for g, w in self.weights.items()
        )

    def update(self, keep: Keep) -> float:
        """Record one iteration's deterministic subnet; returns its similarity to the previous one."""
        sim = self.similarity(keep)
        self.streak = self.streak + 1 if sim >= self.min_similarity else 0
        self.prev_keep = {g: k.clone() for g, k in keep.items()}
        self.seen += 1
        return sim

    @property
    def converged(self) -> bool:
        """The stop rule holds: ``patience`` similar iterations in a row, after ``min_iterations``."""
        return self.streak >= self.patience and self.seen >= self.min_iterations

    def state_dict(self) -> dict[str, Any]:
        """The previous deterministic subnet, the streak and the iterations seen (for an exact resume)."""
        return {"prev_keep": self.prev_keep, "streak": self.streak, "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev_keep, self.streak, self.seen = state["prev_keep"], int(state["streak"]), int(state["seen"])
