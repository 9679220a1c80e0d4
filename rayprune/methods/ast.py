"""AST / ThreshNet: Adaptive Search-and-Training (Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023).

Every channel of every channel group gets a learnable importance weight α. One search iteration
(one :meth:`AST.step`):

1. **Thresholds.** ThreshNet, a small width-agnostic policy, picks a mass threshold τ_l per
   channel group from ``actions`` (or a fixed τ without ThreshNet, the paper's ablation).
2. **Sample.** Per group count the fewest channels whose ``softmax(α + s_t·Gumbel)`` mass
   reaches τ_l, scale every count by one global factor found by bisection so the subnet lands in
   ``[target_window·target, target]`` MACs, never below the budget's per-group floor, and keep
   each group's most probable channels (:func:`calibrate_to_target`). The noise scale s_t
   anneals linearly to 0.
3. **Train.** Slice the subnet out of the target net and train its weights on search-train for
   the iteration's M epochs (engine ``fit``), with ``alpha_passes`` passes of α on search-val
   (``CE − var_weight·Σ_l Var(α_l)``) spread over them.
4. **Reward.** ``r = −val_loss − β·MACs/MACs_full``; one REINFORCE step of ThreshNet against a
   moving-average baseline.
5. **Map back.** Write the subnet's weights, BN statistics and α into the target net.
6. **Judge.** Draw the *deterministic* subnet (ThreshNet's most likely τ, no noise, same
   calibration) and compare it with the previous iteration's (:class:`ConvergenceTracker`).

Once the deterministic subnet has converged (or after ``max_iterations``), one last step trains
it like any sample and scores it on search-val; it is the method's result (never chosen on
test). ``finalize`` fine-tunes it from its inherited weights (α folded in): CE in the efficient
mode, KD from ``ctx.teacher`` in the robust mode.

α enters the forward pass through forward hooks that scale a channel group's output at every
producer of the group: after its BatchNorm by default (``alpha_position="post_bn"``), or on the
conv output before BN (``"pre_bn"``, the reference code's placement, where BN largely cancels it).
The hook sites are derived from the family's layer walk and ``tensor_axes``, so the method works
for every family (cifar_resnet, vgg, mobilenet_v2, ...). The deviations from the released code
are listed, with their reasons, in the docstring of :class:`ASTHparams`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from .. import models
from ..engine.checkpoint import safe_load
from ..engine.data import make_loader
from ..engine.train import TrainConfig, evaluate, fit
from ..engine.utils import derive_seed
from ..models.base import Spec, SpecError
from ..models.transfer import extract_subnet, write_back
from . import register
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord

Keep = dict[str, torch.Tensor]  # channel group -> sorted kept indices (LongTensor)
Alpha = dict[str, torch.Tensor]  # channel group -> per-channel importance weights

ACTIONS = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85)
POLICY_INPUT = 64  # every group's α profile is resampled to this many values
POLICY_HIDDEN = 32
MASS_EPS = 1e-9  # cumulative mass compares against τ − MASS_EPS, so float round-off never adds a channel
ALPHA_BETAS, ALPHA_WEIGHT_DECAY = (0.5, 0.999), 1e-4  # α's Adam (see AlphaOptimizer)
CALIBRATION_STEPS = 40  # bisection steps on the global width scale (far below any one-channel change)

# --------------------------------------------------------------------------------------------
# Subnet sampling
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
) -> Calibrated:
    """Each group's width is its mass-threshold count ``m_l`` (the channels whose
    ``softmax(α)`` mass reaches τ_l, :func:`soft_mass_count`) times one global scale ``c``,
    clamped to ``[floor_l, width_l]``; ``c`` is found by bisection as the largest scale whose
    subnet still fits ``target_macs``. The channels kept are each group's most probable ones.

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
    keep = {g: r.order[: chosen[g]].sort().values for g, r in ranking.items()}
    return Calibrated(keep, macs, lo, macs >= window * target_macs)


def _fill_to_target(
    widths: dict[str, int],
    ideal: Mapping[str, float],
    ranking: Mapping[str, GroupRanking],
    divisors: Mapping[str, int],
    target_macs: int,
    cost: Any,
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
        for g in {a for a in axes[f"{layer.name}.weight"] if a is not None}:
            out[g] += layer.macs
    return out


# --------------------------------------------------------------------------------------------
# α in the forward pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlphaSite:
    """A module whose output is scaled channel-wise by the α of ``group``."""

    module: str
    group: str


def alpha_sites(spec: Spec, position: str = "post_bn", input_size: int | None = None) -> list[AlphaSite]:
    """Where α is applied: one site per producer of a channel group (a conv/linear layer whose
    output axis is the group). ``post_bn``: the BN right after the producer in the layer walk
    (the producer itself when it has none, e.g. the ``avgpool_conv`` shortcut conv); ``pre_bn``:
    always the producer."""
    axes = models.tensor_axes(spec)
    walk = models.layers(spec, input_size)
    sites = []
    for i, layer in enumerate(walk):
        if layer.kind == "bn":
            continue
        key = f"{layer.name}.weight"
        if key not in axes:
            raise SpecError(f"{spec['family']}: layer {layer.name!r} has no tensor_axes entry {key!r}")
        group = axes[key][0]
        if group is None:
            continue
        nxt = walk[i + 1] if i + 1 < len(walk) else None
        has_bn = nxt is not None and nxt.kind == "bn" and axes.get(f"{nxt.name}.weight") == (group,)
        sites.append(AlphaSite(nxt.name if (has_bn and position == "post_bn") else layer.name, group))
    return sites


def _channel_view(a: torch.Tensor, ndim: int) -> torch.Tensor:
    return a.view(1, -1, *([1] * (ndim - 2)))


def attach_alpha(net: nn.Module, sites: Sequence[AlphaSite], alpha: Mapping[str, torch.Tensor]) -> list[Any]:
    """Register forward hooks that multiply each site's output by its group's α (looked up in
    ``alpha`` at call time). Returns the hook handles (``handle.remove()`` detaches)."""
    modules = dict(net.named_modules())

    def hook_for(group: str):
        def scale(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return output * _channel_view(alpha[group].to(output.dtype), output.ndim)

        return scale

    return [modules[s.module].register_forward_hook(hook_for(s.group)) for s in sites]


@torch.no_grad()
def fold_alpha(
    state: Mapping[str, torch.Tensor], sites: Sequence[AlphaSite], alpha: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with α folded into each site's weight and bias (scaling a BN's affine
    or a conv's filters scales its output), so the plain network computes what the hooked one
    does."""
    out = {k: v.detach().clone() for k, v in state.items()}
    for s in sites:
        a = alpha[s.group].detach().to(torch.float32).cpu()
        for key in (f"{s.module}.weight", f"{s.module}.bias"):
            if key in out:
                t = out[key]
                out[key] = t * a.to(t.device, t.dtype).view(-1, *([1] * (t.ndim - 1)))
    return out


def alpha_variance(alpha: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_l Var(α_l)`` (population variance, so 1-channel groups count as 0), differentiable.

    Summed, not averaged, over the groups: each group's α then gets the same spreading force
    whatever the depth of the net (averaged over ResNet-56's 30 groups it was inert)."""
    return torch.stack([a.var(correction=0) for a in alpha.values()]).sum()


# --------------------------------------------------------------------------------------------
# ThreshNet
# --------------------------------------------------------------------------------------------


class ThreshNet(nn.Module):
    """Width-agnostic threshold policy shared by all channel groups.

    Input per group: its sorted (descending) ``softmax(α)`` times the width (1.0 everywhere when
    α is uniform), linearly resampled to 64 values, plus a learned embedding of the group's
    relative depth. MLP 64 → 32 → len(actions) with ReLU; output: logits over the actions.
    """

    def __init__(self, n_actions: int) -> None:
        super().__init__()
        self.depth = nn.Linear(1, POLICY_INPUT)
        self.mlp = nn.Sequential(nn.Linear(POLICY_INPUT, POLICY_HIDDEN), nn.ReLU(), nn.Linear(POLICY_HIDDEN, n_actions))

    def forward(self, profiles: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        return self.mlp(profiles + self.depth(depths.view(-1, 1)))


def policy_inputs(alpha: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(profiles [L, 64], relative depths [L]) for the groups of ``alpha`` in forward order."""
    profiles = []
    for a in alpha.values():
        q = torch.softmax(a.detach().float().cpu(), 0).sort(descending=True).values * a.numel()
        profiles.append(F.interpolate(q.view(1, 1, -1), size=POLICY_INPUT, mode="linear", align_corners=True).view(-1))
    n = len(profiles)
    depths = torch.arange(n, dtype=torch.float32) / max(1, n - 1)
    return torch.stack(profiles), depths


class MovingBaseline:
    """REINFORCE baseline ``b_t = 0.9·b_{t−1} + 0.1·r_t`` with ``b_1 = r_1``."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.value: float | None = None

    def update(self, reward: float) -> float:
        """Fold ``reward`` in and return the advantage ``r_t − b_t``."""
        self.value = reward if self.value is None else self.decay * self.value + (1 - self.decay) * reward
        return reward - self.value


def reinforce_step(
    policy: ThreshNet,
    optimizer: torch.optim.Optimizer,
    profiles: torch.Tensor,
    depths: torch.Tensor,
    actions: torch.Tensor,
    advantage: float,
) -> float:
    """One policy-gradient step on ``−advantage · Σ_l log π(a_l)``; returns that loss."""
    log_probs = torch.log_softmax(policy(profiles, depths), dim=1)
    loss = -advantage * log_probs.gather(1, actions.view(-1, 1)).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


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
        return self.streak >= self.patience and self.seen >= self.min_iterations

    def state_dict(self) -> dict[str, Any]:
        return {"prev_keep": self.prev_keep, "streak": self.streak, "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev_keep, self.streak, self.seen = state["prev_keep"], int(state["streak"]), int(state["seen"])


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------

Schedule = list[tuple[int, float]]

#: Named starting points for the schedule fields; explicitly given fields override them.
#: ``paper``: the released code's budget (Lu et al.): M = 40 weight epochs per iteration for the
#: first 20 iterations, 30 up to iteration 50, then 10, with lr 0.05 / 0.01 / 0.005 on the same
#: boundaries (the code's 1-based ``t <= 20`` is the first 20 iterations, i.e. 0-based 0..19),
#: T_max 50: about 1,700 subnet epochs. ``fast`` (the default): the same shape compressed for
#: quick runs (digits, CIFAR subsets): 2 epochs per iteration, no stop before the noise is gone
#: (iteration 10), at most 30 iterations (20 to 60 subnet epochs).
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "max_iterations": 30,
        "min_iterations": 10,
        "epochs_schedule": [(0, 2)],
        "lr_schedule": [(0, 0.05), (10, 0.01), (20, 0.005)],
        "noise_iterations": 10,
    },
    "paper": {
        "max_iterations": 50,
        "min_iterations": 30,
        "epochs_schedule": [(0, 40), (20, 30), (50, 10)],
        "lr_schedule": [(0, 0.05), (20, 0.01), (50, 0.005)],
        "noise_iterations": 30,
    },
}


def _at(schedule: Schedule, iteration: int) -> float:
    return [value for start, value in schedule if start <= iteration][-1]


class ASTHparams(MethodHparams):
    """AST hyperparameters (every field is a search-space key).

    ``preset`` fills the schedule fields (see :data:`PRESETS`); any field given explicitly wins.

    Where this departs from the released code (Lxtccc/Adaptive-), and why:

    * the *subnet* is trained and mapped back (the code trains the target, then overwrites it);
    * ThreshNet is width-agnostic and learns from ``r = −val_loss − β·MACs ratio`` against a
      moving baseline with one Adam created once (the code's advantage is identically zero);
    * α scales the BN output (``post_bn``; the code's pre-BN placement is largely cancelled by BN);
      its variance bonus is per group, summed; its lr follows the weight-lr phases; it gets
      ``alpha_passes`` passes on search-val per iteration, spread over the weight epochs;
    * the Gumbel noise anneals linearly to 0 over ``noise_iterations`` (the code switches it off
      after iteration 50), so the search ends on what α and the policy have learned;
    * one kept-index set per channel group keeps residual adds aligned;
    * every subnet is drawn to the FLOPs target (one global width scale, :func:`calibrate_to_target`),
      never below the budget's per-group floor;
    * the search stops when AST's deterministic subnet converges (:class:`ConvergenceTracker`),
      and that subnet, trained like any sample and scored on search-val, is the result.

    The random-search ablation: ``freeze_alpha=true, threshnet=false, stop_on_convergence=false``
    with ``max_iterations`` set to what the full run used: α stays uniform (so the Gumbel noise
    alone orders the channels: a fresh random channel subset per group each iteration, never
    annealed), τ is fixed, and the best sample by search-val is the result.
    """

    preset: Literal["fast", "paper"] = Field("fast", description="schedule preset: 'fast' or the reference 'paper'")
    max_iterations: int = Field(30, ge=1, description="T_max: search iterations unless converged earlier")
    min_iterations: int = Field(10, ge=1, description="no convergence stop before this many iterations")
    epochs_schedule: Schedule = Field(
        default=[(0, 2)], description="[(first iteration, M)]: weight epochs per iteration"
    )
    lr_schedule: Schedule = Field(
        default=[(0, 0.05), (10, 0.01), (20, 0.005)],
        description="[(first iteration, lr)]: the weight lr of an iteration (cosine within it)",
    )
    noise_iterations: int = Field(10, ge=0, description="the Gumbel scale anneals linearly to 0 over these iterations")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(3e-4, ge=0.0)
    batch_size: int = Field(128, ge=1)
    alpha_lr: float = Field(
        0.02, gt=0.0, description="α Adam lr per pass over search-val, first lr phase (scaled with it)"
    )
    alpha_passes: int = Field(5, ge=1, description="α passes over search-val per iteration, spread over its epochs")
    var_weight: float = Field(1.0, ge=0.0, description="weight of −Σ_l Var(α_l) in the α loss")
    freeze_alpha: bool = Field(False, description="ablation: α stays uniform and untrained")
    gumbel_scale: float = Field(0.05, ge=0.0)
    swap_margin: float = Field(
        0.1, ge=0.0, description="α margin by which a channel must beat a kept one to displace it"
    )
    actions: tuple[float, ...] = Field(ACTIONS, min_length=1, description="mass thresholds ThreshNet picks from")
    beta: float = Field(2.0, ge=0.0, description="weight of the MACs ratio in the ThreshNet reward")
    threshnet: bool = Field(True, description="False: the 'w/o ThreshNet' ablation (fixed_threshold everywhere)")
    fixed_threshold: float = Field(0.7, gt=0.0, le=1.0, description="τ of every group when threshnet is off")
    policy_lr: float = Field(3e-3, gt=0.0)
    alpha_position: Literal["post_bn", "pre_bn"] = "post_bn"
    residual_mode: Literal["coupled", "independent"] = "coupled"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of the train set used as search-val")
    target_window: float = Field(0.9, gt=0.0, le=1.0, description="subnets land in [window·target, target] MACs")
    stop_on_convergence: bool = True
    convergence_similarity: float = Field(0.9, gt=0.0, le=1.0, description="see ConvergenceTracker")
    convergence_patience: int = Field(3, ge=1)
    select: Literal["deterministic", "best_sampled"] | None = Field(
        None,
        description="the result: the converged deterministic subnet, or the best sample by search-val "
        "(default: best_sampled when freeze_alpha, else deterministic)",
    )
    warm_start: str | None = Field(
        None,
        description="None: cold start; 'teacher': ctx.teacher's weights; else a path to a state_dict of the full net",
    )
    search_kd_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="KD weight when training subnets (needs a teacher)"
    )
    top_k: int = Field(3, ge=1, description="sampled subnets (by search-val accuracy) whose weights are kept")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "fast")
            if preset in PRESETS:
                return {**PRESETS[preset], **data}
        return data

    @field_validator("actions")
    @classmethod
    def _thresholds_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0.0 < t <= 1.0 for t in v):
            raise ValueError(f"every action (mass threshold) must be in (0, 1], got {list(v)}")
        return v

    @field_validator("residual_mode")
    @classmethod
    def _coupled_only(cls, v: str) -> str:
        if v != "coupled":
            raise ValueError(
                "residual_mode='independent' (the reference code's per-conv index sets, which misalign "
                "residual adds) is not supported: rayprune prunes residual-tied channels as one group; "
                "use residual_mode='coupled'"
            )
        return v

    @field_validator("lr_schedule", "epochs_schedule")
    @classmethod
    def _schedule_starts_at_zero(cls, v: Schedule, info: Any) -> Schedule:
        starts = [s for s, _ in v]
        if not v or starts[0] != 0 or starts != sorted(set(starts)) or any(x <= 0 for _, x in v):
            raise ValueError(
                f"{info.field_name} must be [(0, value), (later iteration, value), ...] with "
                f"increasing iterations and positive values, got {v}"
            )
        if info.field_name == "epochs_schedule" and any(int(x) != x for _, x in v):
            raise ValueError(f"epochs_schedule needs whole epoch counts, got {v}")
        return v

    def lr_at(self, iteration: int) -> float:
        return _at(self.lr_schedule, iteration)

    def epochs_at(self, iteration: int) -> int:
        return int(_at(self.epochs_schedule, iteration))

    def alpha_lr_at(self, iteration: int) -> float:
        """α's lr decays with the weight-lr phases (same ratio to the first phase)."""
        return self.alpha_lr * self.lr_at(iteration) / self.lr_at(0)

    def noise_at(self, iteration: int) -> float:
        if self.freeze_alpha or self.noise_iterations == 0:
            return self.gumbel_scale if self.freeze_alpha else 0.0
        return self.gumbel_scale * max(0.0, 1.0 - iteration / self.noise_iterations)

    @property
    def selection(self) -> str:
        return self.select or ("best_sampled" if self.freeze_alpha else "deterministic")


def alpha_pass_counts(epochs: int, passes: int) -> list[int]:
    """α passes after each of ``epochs`` weight epochs: ``passes`` in all, evenly spread (the
    reference interleaves one every M/5 epochs); with fewer epochs than passes some epochs are
    followed by several.

    >>> alpha_pass_counts(40, 5)[:9], alpha_pass_counts(2, 5)
    ([0, 0, 0, 0, 0, 0, 0, 1, 0], [2, 3])
    """
    return [(e + 1) * passes // epochs - e * passes // epochs for e in range(epochs)]


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """A trained subnet: its record and its weights with α folded in (what finalize starts from)."""

    record: SubnetRecord
    state: dict[str, torch.Tensor]


@register("ast")
class AST(Method):
    """Adaptive search-and-training with ThreshNet.

    One :meth:`step` is one search-train-map iteration; once the stop rule holds, one last step
    trains the deterministic subnet (``select='deterministic'``) and the search is done.
    """

    Hparams = ASTHparams
    inherits_weights: ClassVar[bool] = True
    # The reference fine-tunes the selected subnet from its inherited weights at a small lr
    # (its script: 1e-4 over 800 epochs, likely experiment-specific); 0.01 with cosine and no
    # warm-up is the usual inherited-weights fine-tune on CIFAR.
    finetune_defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "warmup_epochs": 0, "weight_decay": 5e-4}
    smoke: ClassVar[dict] = {
        "max_iterations": 3,
        "min_iterations": 1,
        "epochs_schedule": [(0, 1)],
        "batch_size": 64,
        "top_k": 2,
        "alpha_passes": 1,
    }

    def __init__(self, ctx: RunContext, hparams: ASTHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        hp: ASTHparams = self.hp
        if hp.search_kd_weight > 0 and ctx.teacher is None:
            from ..errors import InputError

            raise InputError(
                "ast: search_kd_weight > 0 needs a teacher (ctx.teacher); set it or use search_kd_weight=0"
            )
        self.spec, self.input_size = ctx.spec, ctx.input_size
        self.groups = models.channel_groups(self.spec)
        self.floors = ctx.budget.min_widths(self.spec)
        self.divisors = {g.name: g.divisor for g in self.groups}
        self.full_macs = models.macs(self.spec, self.input_size)
        self.target_macs = ctx.budget.target_macs(self.spec, self.input_size)
        self.search_train, self.search_val = ctx.search_split(hp.val_fraction)
        # Private randomness: α init, Gumbel noise, actions and per-iteration seeds all come from
        # this generator (global RNG is never read), so a resumed run replays exactly.
        self.gen = torch.Generator().manual_seed(derive_seed("ast", ctx.seed))
        self.target = self._initial_target()
        self.alpha: Alpha = {g.name: initial_alpha(g.width, self.gen, hp.freeze_alpha) for g in self.groups}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("ast-policy", ctx.seed))
            self.policy = ThreshNet(len(hp.actions))
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=hp.policy_lr)
        self.baseline = MovingBaseline()
        self.convergence = ConvergenceTracker(
            group_macs(self.spec, self.input_size),
            self.divisors,
            hp.convergence_similarity,
            hp.convergence_patience,
            hp.min_iterations,
        )
        self.iteration = 0
        self.top: list[Trained] = []  # the best sampled subnets, best first
        self.final: Trained | None = None

    # -- setup ---------------------------------------------------------------------------------
    def _initial_target(self) -> dict[str, torch.Tensor]:
        """The target net's state: random (cold start), the teacher's or a checkpoint's weights."""
        state = models.build(self.spec, seed=derive_seed("ast-target", self.ctx.seed)).state_dict()
        source = self.hp.warm_start
        if source is None:
            return state
        if source == "teacher":
            if self.ctx.teacher is None:
                from ..errors import InputError

                raise InputError("ast: warm_start='teacher' needs ctx.teacher; pass a teacher or a checkpoint path")
            loaded = self.ctx.teacher.state_dict()
        else:
            loaded = safe_load(
                source, "warm_start weights", "point warm_start at a state_dict of the unpruned net", expect=None
            )
            loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        missing = sorted(set(state) ^ set(loaded))
        if missing or any(loaded[k].shape != v.shape for k, v in state.items()):
            raise SpecError(
                f"ast: warm_start {source!r} does not match the full spec "
                f"(first differing key: {missing[0] if missing else 'a tensor shape'}); "
                f"warm-start from weights of the unpruned {self.spec['family']} spec"
            )
        return {k: loaded[k].detach().cpu().clone() for k in state}

    @property
    def search_finished(self) -> bool:
        """The stop rule: converged (when allowed to stop on it) or out of iterations."""
        converged = self.hp.stop_on_convergence and self.convergence.converged
        return converged or self.iteration >= self.hp.max_iterations

    @property
    def planned_steps(self) -> int:
        # max_iterations sampled iterations, then (unless best_sampled) the deterministic subnet's step
        return self.hp.max_iterations + (self.hp.selection != "best_sampled")

    @property
    def done(self) -> bool:
        if self.hp.selection == "best_sampled":
            return self.search_finished
        return self.final is not None

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> StepResult:
        if self.done:
            raise RuntimeError("ast: the search is finished; call finalize()")
        if self.search_finished:
            return self._train_deterministic()
        t, hp = self.iteration, self.hp
        taus, profiles, depths, actions = self._choose_thresholds(greedy=False)
        drawn = self._draw(taus, hp.noise_at(t))
        trained, val, train_loss = self._train_and_score(drawn.keep, t, update_alpha=not hp.freeze_alpha)
        reward = -val["loss"] - hp.beta * trained.record.macs / self.full_macs
        advantage = self.baseline.update(reward)
        if hp.threshnet:
            reinforce_step(self.policy, self.policy_opt, profiles, depths, actions, advantage)
        trained.record.source.update(
            iteration=t,
            mean_tau=sum(taus.values()) / len(taus),
            width_scale=drawn.scale,
            in_window=drawn.in_window,
            gumbel_scale=hp.noise_at(t),
        )
        self._remember(trained)
        deterministic = self.deterministic_subnet()
        similarity = self.convergence.update(deterministic.keep)
        self.iteration = self.steps_done = t + 1
        metrics = {
            "iteration": float(t),
            "macs": float(trained.record.macs),
            "macs_ratio": trained.record.macs / self.full_macs,
            "target_ratio": self.target_macs / self.full_macs,
            "val_top1": val["top1"],
            "val_loss": val["loss"],
            "train_loss": train_loss,
            "reward": reward,
            "baseline": float(self.baseline.value),
            "mean_tau": trained.record.source["mean_tau"],
            "gumbel_scale": hp.noise_at(t),
            "alpha_entropy": mean_alpha_entropy(self.alpha),
            "policy_entropy": self.policy_entropy(),
            "det_similarity": similarity,
            "det_macs_ratio": deterministic.macs / self.full_macs,
            "converged": float(self.convergence.converged),
        }
        return StepResult(step=t, metrics=metrics, subnets=[trained.record], done=self.done)

    def _train_deterministic(self) -> StepResult:
        """The final step: train AST's deterministic subnet like any sample and score it."""
        t = self.iteration
        drawn = self.deterministic_subnet()
        trained, val, train_loss = self._train_and_score(drawn.keep, t, update_alpha=False)
        trained.record.source.update(
            iteration=t,
            deterministic=True,
            in_window=drawn.in_window,
            converged=bool(self.convergence.converged),
            search_iterations=t,
        )
        self.final = trained
        self.steps_done = t + 1
        metrics = {
            "iteration": float(t),
            "macs": float(trained.record.macs),
            "macs_ratio": trained.record.macs / self.full_macs,
            "val_top1": val["top1"],
            "val_loss": val["loss"],
            "train_loss": train_loss,
            "final": 1.0,
            "converged": float(self.convergence.converged),
            "search_iterations": float(t),
        }
        return StepResult(step=t, metrics=metrics, subnets=[trained.record], done=True)

    def deterministic_subnet(self) -> Calibrated:
        """What the current α and policy choose: greedy τ, no Gumbel noise, drawn to the target."""
        taus = self._choose_thresholds(greedy=True)[0]
        return self._draw(taus, 0.0)

    def _draw(self, taus: Mapping[str, float], gumbel_scale: float) -> Calibrated:
        ranking = rank_channels(self.alpha, self.gen, gumbel_scale, self.convergence.prev_keep, self.hp.swap_margin)
        return calibrate_to_target(
            self.spec,
            ranking,
            taus,
            self.floors,
            self.divisors,
            self.target_macs,
            self.hp.target_window,
            self.input_size,
        )

    def _choose_thresholds(self, greedy: bool) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-group τ from ThreshNet (sampled from its policy, or its most likely action) or the
        fixed threshold."""
        profiles, depths = policy_inputs(self.alpha)
        if not self.hp.threshnet:
            actions = torch.zeros(len(self.alpha), dtype=torch.long)
            return {g: self.hp.fixed_threshold for g in self.alpha}, profiles, depths, actions
        with torch.no_grad():
            probs = torch.softmax(self.policy(profiles, depths), dim=1)
        actions = probs.argmax(dim=1) if greedy else torch.multinomial(probs, 1, generator=self.gen).view(-1)
        taus = {g: float(self.hp.actions[a]) for g, a in zip(self.alpha, actions.tolist(), strict=True)}
        return taus, profiles, depths, actions

    def policy_entropy(self) -> float:
        """ThreshNet's mean per-group entropy, normalised to [0, 1] (1: uniform over the actions)."""
        if not self.hp.threshnet or len(self.hp.actions) < 2:
            return 0.0
        with torch.no_grad():
            p = torch.softmax(self.policy(*policy_inputs(self.alpha)), dim=1)
        return float((-(p * p.clamp_min(1e-12).log()).sum(1) / math.log(p.shape[1])).mean())

    def _train_and_score(self, keep: Keep, t: int, update_alpha: bool) -> tuple[Trained, dict[str, float], float]:
        """Slice the subnet out of the target, train it (and its α), score it on search-val, and
        map the trained weights and α back into the target."""
        hp = self.hp
        sub_spec, sub_state = extract_subnet(self.spec, self.target, keep)
        sub_alpha = {g: self.alpha[g][k].clone() for g, k in keep.items()}
        net, train_loss = self._train_subnet(sub_spec, sub_state, sub_alpha, keep, t, update_alpha)
        val = evaluate(net, self.search_val, device=self.ctx.device)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        sub_alpha = {g: a.detach().cpu() for g, a in sub_alpha.items()}
        map_back(self.spec, self.target, self.alpha, keep, state, sub_alpha)
        record = SubnetRecord.of(
            sub_spec, {"val_top1": val["top1"], "val_loss": val["loss"]}, self.name, t, self.input_size
        )
        folded = fold_alpha(state, alpha_sites(sub_spec, hp.alpha_position, self.input_size), sub_alpha)
        return Trained(record, folded), {"top1": float(val["top1"]), "loss": float(val["loss"])}, train_loss

    def _train_subnet(
        self,
        sub_spec: Spec,
        sub_state: dict[str, torch.Tensor],
        sub_alpha: Alpha,
        keep: Keep,
        t: int,
        update_alpha: bool,
    ) -> tuple[nn.Module, float]:
        """``epochs_at(t)`` weight epochs on search-train, with ``alpha_passes`` α passes on
        search-val spread over them. ``sub_alpha`` is updated in place; returns the trained net
        (α hooks attached) and its last training loss."""
        hp, device = self.hp, self.ctx.device
        net = models.build(sub_spec, seed=0)
        net.load_state_dict(sub_state)
        net.to(device)
        for g in sub_alpha:
            sub_alpha[g] = sub_alpha[g].to(device)
        # The hooks read sub_alpha at call time, so they follow the α passes' updates.
        attach_alpha(net, alpha_sites(sub_spec, hp.alpha_position, self.input_size), sub_alpha)
        epochs = hp.epochs_at(t)
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=hp.batch_size,
            lr=hp.lr_at(t),
            momentum=hp.momentum,
            nesterov=False,
            weight_decay=hp.weight_decay,
            schedule="cosine",
            kd_weight=hp.search_kd_weight,
            kd_temperature=self.ctx.kd_temperature,
        )
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
        passes = alpha_pass_counts(epochs, hp.alpha_passes) if update_alpha else [0] * epochs
        batches = math.ceil(len(self.search_val) / hp.batch_size)
        alpha_opt = AlphaOptimizer(sub_alpha, hp.alpha_lr_at(t), batches, self.alpha, keep) if update_alpha else None

        def after_epoch(entry: dict[str, float]) -> None:
            for i in range(passes[int(entry["epoch"])]):
                self._alpha_pass(net, alpha_opt, seed + 7919 * (int(entry["epoch"]) + 1) + i)

        history = fit(
            net,
            self.search_train,
            cfg,
            device=device,
            seed=seed,
            progress=self.ctx.progress,
            on_epoch=after_epoch,
            teacher=self.ctx.teacher if hp.search_kd_weight > 0 else None,
        )
        if alpha_opt is not None:
            alpha_opt.write_to(sub_alpha)
        return net, float(history[-1]["loss"]) if history else float("nan")

    def _alpha_pass(self, net: nn.Module, alpha_opt: AlphaOptimizer, seed: int) -> None:
        """One pass over search-val updating only α with ``CE − var_weight·Σ_l Var(α_l)``.
        BN running statistics are restored afterwards so they only ever see search-train."""
        buffers = {k: v.clone() for k, v in net.named_buffers()}
        weights = [p for p in net.parameters() if p.requires_grad]
        for p in weights:
            p.requires_grad_(False)
        was_training = net.training
        net.train()
        for x, y in make_loader(
            self.search_val, self.hp.batch_size, train=True, device=self.ctx.device, seed=seed, drop_last=False
        ):
            loss = F.cross_entropy(net(x).float(), y) - self.hp.var_weight * alpha_variance(alpha_opt.whole_groups())
            alpha_opt.step(loss)
        net.train(was_training)
        for p in weights:
            p.requires_grad_(True)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])

    def _remember(self, trained: Trained) -> None:
        """Keep the top-k samples (search-val top-1, then lower loss, then earlier) with weights."""
        self.top.append(trained)
        self.top.sort(key=lambda s: (-s.record.metrics["val_top1"], s.record.metrics["val_loss"], s.record.step))
        del self.top[self.hp.top_k :]

    # -- results -------------------------------------------------------------------------------
    def best(self) -> SubnetRecord:
        """The deterministic subnet once trained; until then (and for ``select='best_sampled'``)
        the best sample by search-val accuracy."""
        if self.final is not None:
            return self.final.record
        if not self.top:
            raise RuntimeError("ast: no subnet sampled yet; call step() first")
        return self.top[0].record

    def initial_weights(self, record: SubnetRecord) -> dict[str, torch.Tensor] | None:
        """The record's trained weights (α folded in) when it is the final or a top-k subnet."""
        for kept in ([self.final] if self.final else []) + self.top:
            if kept.record.step == record.step and kept.record.key == record.key:
                return {k: v.clone() for k, v in kept.state.items()}
        return None

    def state_dict(self) -> dict[str, Any]:
        def trained(t: Trained) -> dict[str, Any]:
            return {"record": t.record.to_dict(), "state": t.state}

        return {
            "iteration": self.iteration,
            "target": {k: v.clone() for k, v in self.target.items()},
            "alpha": {g: a.clone() for g, a in self.alpha.items()},
            "policy": self.policy.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "baseline": self.baseline.value,
            "generator": self.gen.get_state(),
            "convergence": self.convergence.state_dict(),
            "top": [trained(t) for t in self.top],
            "final": trained(self.final) if self.final else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def trained(d: dict[str, Any]) -> Trained:
            return Trained(SubnetRecord.from_dict(d["record"]), d["state"])

        self.iteration = int(state["iteration"])
        self.target = {k: v.clone() for k, v in state["target"].items()}
        self.alpha = {g: a.clone() for g, a in state["alpha"].items()}
        self.policy.load_state_dict(state["policy"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.baseline.value = state["baseline"]
        self.gen.set_state(state["generator"])
        self.convergence.load_state_dict(state["convergence"])
        self.top = [trained(t) for t in state["top"]]
        self.final = trained(state["final"]) if state["final"] else None
        self.steps_done = self.iteration + (1 if self.final else 0)


class AlphaOptimizer:
    """Adam over one subnet's α, kept across the passes of an iteration.

    The reference uses SGD (lr 1e-3, momentum 0.9), under which α barely moves, while a larger
    SGD lr lets the variance bonus grow α exponentially until the activations overflow. Adam's
    step is bounded by its lr, and the lr is divided by the batches per pass, so one pass moves
    each α by at most about ``lr`` whatever the size of search-val (the DARTS habit for
    architecture weights, with its betas).

    The variance bonus is taken over each *whole* group (:meth:`whole_groups`: the subnet's α
    in place, the other channels' α as constants), not over the kept channels alone: the kept
    channels are the group's most important, so the bonus pushes them apart from the rest. Over
    the kept channels alone it pushes the weakest kept channel below channels that were not
    kept, they swap places at the next draw, and the subnet oscillates instead of converging.
    """

    def __init__(self, sub_alpha: Alpha, lr: float, batches_per_pass: int, full_alpha: Alpha, keep: Keep) -> None:
        self.leaves = {g: a.detach().clone().requires_grad_(True) for g, a in sub_alpha.items()}
        sub_alpha.update(self.leaves)  # the forward hooks now read the leaves
        self.full = {g: full_alpha[g].detach().to(a.device, a.dtype) for g, a in self.leaves.items()}
        self.keep = {g: keep[g].to(a.device) for g, a in self.leaves.items()}
        self.opt = torch.optim.Adam(
            list(self.leaves.values()),
            lr=lr / max(1, batches_per_pass),
            betas=ALPHA_BETAS,
            weight_decay=ALPHA_WEIGHT_DECAY,
        )

    def whole_groups(self) -> Alpha:
        """Each group's full α vector with the subnet's (trainable) α at the kept indices."""
        return {g: self.full[g].index_put((self.keep[g],), leaf) for g, leaf in self.leaves.items()}

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def write_to(self, sub_alpha: Alpha) -> None:
        for g, a in self.leaves.items():
            sub_alpha[g] = a.detach()


def mean_alpha_entropy(alpha: Mapping[str, torch.Tensor]) -> float:
    """Mean over groups of the normalised entropy of softmax(α_l) (1: uniform, →0: one channel)."""
    values = []
    for a in alpha.values():
        if a.numel() < 2:
            continue
        p = torch.softmax(a.detach().double(), 0)
        values.append(float(-(p * p.clamp_min(1e-300).log()).sum() / math.log(a.numel())))
    return sum(values) / len(values) if values else 0.0


def initial_alpha(width: int, gen: torch.Generator, uniform: bool = False) -> torch.Tensor:
    """α at the start: the reference's U[0, 1) draw shifted by +0.5, or all ones (``uniform``).

    The shift changes nothing for sampling (softmax ignores a constant), but α also scales the
    channels in the forward pass, and around 1 it starts as (nearly) the identity rather than
    silencing the channels that drew a small value: on digits (α nearly frozen, fixed τ) this
    alone took the search-val top-1 after 8 iterations from 0.69 to 0.92 (``pre_bn``, where BN
    cancels α's scale: 0.87)."""
    if uniform:
        return torch.ones(width)
    return torch.rand(width, generator=gen) + 0.5


@torch.no_grad()
def map_back(
    spec: Spec,
    target: dict[str, torch.Tensor],
    alpha: Alpha,
    keep: Keep,
    sub_state: Mapping[str, torch.Tensor],
    sub_alpha: Mapping[str, torch.Tensor],
) -> None:
    """Write a trained subnet's weights, BN statistics and α into the target net at ``keep``."""
    write_back(spec, target, keep, sub_state)
    for g, idx in keep.items():
        alpha[g][idx] = sub_alpha[g].to(alpha[g].dtype)
