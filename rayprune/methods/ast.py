"""AST / ThreshNet: Adaptive Search-and-Training (Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023).

Every channel of every channel group gets a learnable importance weight α. One search iteration
(one :meth:`AST.step`):

1. **Thresholds.** ThreshNet, a small width-agnostic policy, picks a mass threshold τ_l per
   channel group from ``actions`` (or a fixed τ without ThreshNet, the paper's ablation).
2. **Sample.** Per group keep the fewest channels whose ``softmax(α + 0.05·Gumbel)`` mass reaches
   τ_l (:func:`mass_threshold_keep`), never below the budget's per-stage minimum width. Above
   the FLOPs target: re-draw with every τ lowered by 0.05 (at most 3 times), then drop the
   lowest-α channels of the groups carrying the most MACs until it fits (:func:`shrink_to_budget`).
3. **Train.** Slice the subnet out of the target net, train its weights on search-train (engine
   ``fit``), then its α for one pass on search-val with ``CE − var_weight·mean_l Var(α_l)``.
4. **Reward.** ``r = −val_loss − β·MACs/MACs_full``; one REINFORCE step of ThreshNet against a
   moving-average baseline.
5. **Map back.** Write the subnet's weights, BN statistics and α into the target net.

The search stops when the sampled subnets converge (:class:`ConvergenceTracker`) or after
``max_iterations``. The best of the top-k subnets by search-val accuracy (never test) is then
fine-tuned by the shared engine from its inherited weights (α folded in): CE in the efficient
mode, KD from ``ctx.teacher`` in the robust mode.

α enters the forward pass through forward hooks that scale a channel group's output at every
producer of the group: after its BatchNorm by default (``alpha_position="post_bn"``), or on the
conv output before BN (``"pre_bn"``, the reference code's placement, where BN largely cancels it).
The hook sites are derived from the family's layer walk and ``tensor_axes``, so the method works
for every family (cifar_resnet, vgg, mobilenet_v2, ...). Deviations from the reference code are
those of ``reference/methods.md`` §3.7 and are listed in the docstring of :class:`ASTHparams`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from .. import models
from ..engine.checkpoint import load as load_checkpoint
from ..engine.data import make_loader
from ..engine.train import TrainConfig, evaluate, fit
from ..models.base import Spec, SpecError
from ..models.transfer import extract_subnet, subnet_spec, write_back
from . import register
from ..engine.utils import derive_seed
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord

Keep = dict[str, torch.Tensor]  # channel group -> sorted kept indices (LongTensor)
Alpha = dict[str, torch.Tensor]  # channel group -> per-channel importance weights

ACTIONS = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85)
POLICY_INPUT = 64  # every group's α profile is resampled to this many values
POLICY_HIDDEN = 32
TAU_STEP_DOWN = 0.05  # a re-draw above the FLOPs target lowers every τ by this much
MAX_REDRAWS = 3
MASS_EPS = 1e-9  # cumulative mass compares against τ − MASS_EPS (methods.md §5 item 11)
ALPHA_MOMENTUM, ALPHA_WEIGHT_DECAY = 0.9, 1e-4  # the reference code's α optimiser

# --------------------------------------------------------------------------------------------
# Subnet sampling
# --------------------------------------------------------------------------------------------


def gumbel_noise(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` i.i.d. Gumbel(0, 1) samples drawn from ``gen`` only."""
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp_(1e-12, 1.0 - 1e-12)
    return -torch.log(-torch.log(u))


def mass_threshold_keep(probs: torch.Tensor, tau: float, min_keep: int = 1, divisor: int = 1) -> torch.Tensor:
    """Kept channel indices (ascending) of one group: the fewest highest-probability channels
    whose cumulative mass reaches ``tau``, raised to ``min_keep`` and to a multiple of ``divisor``
    (capped at the group's width).

    >>> mass_threshold_keep(torch.full((16,), 1 / 16), 0.6).numel()
    10
    """
    width = probs.numel()
    order = torch.argsort(probs, descending=True, stable=True)
    mass = torch.cumsum(probs[order].double(), 0)
    n = int((mass < tau - MASS_EPS).sum()) + 1  # the prefix length that first reaches tau
    n = max(n, min_keep)
    n = min(width, math.ceil(n / divisor) * divisor)
    return order[:n].sort().values


def sample_keep(alpha: Mapping[str, torch.Tensor], taus: Mapping[str, float], gen: torch.Generator,
                gumbel_scale: float, min_widths: Mapping[str, int],
                divisors: Mapping[str, int] | None = None) -> Keep:
    """One subnet: per group, :func:`mass_threshold_keep` over ``softmax(α + scale·Gumbel)``.

    Groups are visited in ``alpha``'s order, so the draw depends only on ``gen``'s state.
    """
    keep = {}
    for g, a in alpha.items():
        logits = a.detach().double().cpu()
        if gumbel_scale > 0:
            logits = logits + gumbel_scale * gumbel_noise(a.numel(), gen)
        probs = torch.softmax(logits, 0)
        keep[g] = mass_threshold_keep(probs, taus[g], min_widths[g], (divisors or {}).get(g, 1))
    return keep


def lowered(taus: Mapping[str, float], times: int) -> dict[str, float]:
    """Every τ lowered by ``times``·0.05 (never below 0.05: a group always keeps channels)."""
    return {g: max(TAU_STEP_DOWN, t - times * TAU_STEP_DOWN) for g, t in taus.items()}


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


def shrink_to_budget(spec: Spec, keep: Keep, alpha: Mapping[str, torch.Tensor], target_macs: int,
                     min_widths: Mapping[str, int], input_size: int | None = None,
                     divisors: Mapping[str, int] | None = None) -> Keep:
    """Deterministically shrink ``keep`` until the subnet fits ``target_macs``: repeatedly take
    the group with the most attributed MACs that is still above its minimum width and drop its
    lowest-α kept channel(s) (down to the next multiple of the group's divisor)."""
    keep = {g: k.clone() for g, k in keep.items()}
    order = list(keep)
    while True:
        sub = subnet_spec(spec, keep)
        if models.macs(sub, input_size) <= target_macs:
            return keep
        attributed = group_macs(sub, input_size)
        shrinkable = [g for g in order if keep[g].numel() > min_widths[g]]
        if not shrinkable:
            raise SpecError(f"cannot reach {target_macs} MACs: every channel group is at its minimum width; "
                            f"raise flops_target or the per-stage pruning rates")
        g = max(shrinkable, key=lambda name: (attributed[name], -order.index(name)))
        d = (divisors or {}).get(g, 1)
        n = max(min_widths[g], (keep[g].numel() - 1) // d * d, 1)
        scores = alpha[g].detach().cpu()[keep[g]]
        survivors = torch.argsort(scores, descending=True, stable=True)[:n]
        keep[g] = keep[g][survivors].sort().values


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
def fold_alpha(state: Mapping[str, torch.Tensor], sites: Sequence[AlphaSite],
               alpha: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    """``mean_l Var(α_l)`` (population variance, so 1-channel groups count as 0), differentiable."""
    return torch.stack([a.var(correction=0) for a in alpha.values()]).mean()


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
        self.mlp = nn.Sequential(nn.Linear(POLICY_INPUT, POLICY_HIDDEN), nn.ReLU(),
                                 nn.Linear(POLICY_HIDDEN, n_actions))

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


def reinforce_step(policy: ThreshNet, optimizer: torch.optim.Optimizer, profiles: torch.Tensor,
                   depths: torch.Tensor, actions: torch.Tensor, advantage: float) -> float:
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


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb)


class ConvergenceTracker:
    """Sampled subnets have converged after ``patience`` consecutive iterations in which every
    group's kept set has Jaccard similarity >= ``min_jaccard`` with the previous iteration's and
    the MACs changed by less than ``macs_tol`` (relative)."""

    def __init__(self, min_jaccard: float = 0.9, macs_tol: float = 0.01, patience: int = 3) -> None:
        self.min_jaccard, self.macs_tol, self.patience = min_jaccard, macs_tol, patience
        self.prev_keep: Keep | None = None
        self.prev_macs: int | None = None
        self.streak = 0

    def min_jaccard_to_previous(self, keep: Keep) -> float:
        """The smallest per-group Jaccard similarity with the previous kept sets (0 before any)."""
        if self.prev_keep is None:
            return 0.0
        return min(jaccard(keep[g], self.prev_keep[g]) for g in keep)

    def stable(self, keep: Keep, macs: int) -> bool:
        if self.prev_keep is None or self.prev_macs is None:
            return False
        if abs(macs - self.prev_macs) >= self.macs_tol * self.prev_macs:
            return False
        return self.min_jaccard_to_previous(keep) >= self.min_jaccard

    def update(self, keep: Keep, macs: int) -> bool:
        """Record one iteration's subnet; True once converged."""
        self.streak = self.streak + 1 if self.stable(keep, macs) else 0
        self.prev_keep, self.prev_macs = {g: k.clone() for g, k in keep.items()}, int(macs)
        return self.converged

    @property
    def converged(self) -> bool:
        return self.streak >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"prev_keep": self.prev_keep, "prev_macs": self.prev_macs, "streak": self.streak}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev_keep, self.prev_macs, self.streak = state["prev_keep"], state["prev_macs"], int(state["streak"])


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------


class ASTHparams(MethodHparams):
    """AST hyperparameters (every field is a search-space key).

    Choices where ``reference/methods.md`` §3.7 departs from the released code: the *subnet* is
    trained and mapped back (not the target); ThreshNet is width-agnostic and learns from
    ``r = −val_loss − β·MACs ratio`` against a moving baseline with one Adam created once; α is
    applied after BN by default; one kept-index set per channel group keeps residual adds
    aligned; the search stops on convergence; the best subnet is chosen on search-val.
    """

    max_iterations: int = Field(50, ge=1, description="T_max: search iterations unless converged earlier")
    epochs_per_iteration: int = Field(5, ge=1, description="M: weight-training epochs of each sampled subnet")
    lr_schedule: list[tuple[int, float]] = Field(
        default=[(0, 0.05), (21, 0.01), (51, 0.005)],
        description="[(first iteration, lr)]: the weight lr of an iteration (cosine within it); the code's steps")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(3e-4, ge=0.0)
    batch_size: int = Field(128, ge=1)
    alpha_lr: float = Field(1e-3, gt=0.0, description="SGD lr of the α pass on search-val")
    var_weight: float = Field(1.0, ge=0.0, description="weight of −mean_l Var(α_l) in the α loss")
    gumbel_scale: float = Field(0.05, ge=0.0)
    actions: tuple[float, ...] = Field(ACTIONS, min_length=1, description="mass thresholds ThreshNet picks from")
    beta: float = Field(2.0, ge=0.0, description="weight of the MACs ratio in the ThreshNet reward")
    threshnet: bool = Field(True, description="False: the 'w/o ThreshNet' ablation (fixed_threshold everywhere)")
    fixed_threshold: float = Field(0.7, gt=0.0, le=1.0, description="τ of every group when threshnet is off")
    policy_lr: float = Field(1e-3, gt=0.0)
    alpha_position: Literal["post_bn", "pre_bn"] = "post_bn"
    residual_mode: Literal["coupled", "independent"] = "coupled"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of the train set used as search-val")
    convergence_jaccard: float = Field(0.9, gt=0.0, le=1.0)
    convergence_macs: float = Field(0.01, gt=0.0)
    convergence_patience: int = Field(3, ge=1)
    warm_start: str | None = Field(None, description="None: cold start; 'teacher': ctx.teacher's weights; "
                                                     "else a path to a state_dict of the full net")
    search_kd_weight: float = Field(0.0, ge=0.0, le=1.0, description="KD weight when training subnets (needs a teacher)")
    top_k: int = Field(3, ge=1, description="subnets (by search-val accuracy) whose weights are kept for finalize")

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
            raise ValueError("residual_mode='independent' (the reference code's per-conv index sets, which misalign "
                             "residual adds) is not supported: rayprune prunes residual-tied channels as one group; "
                             "use residual_mode='coupled'")
        return v

    @field_validator("lr_schedule")
    @classmethod
    def _schedule_starts_at_zero(cls, v: list[tuple[int, float]]) -> list[tuple[int, float]]:
        starts = [s for s, _ in v]
        if not v or starts[0] != 0 or starts != sorted(set(starts)) or any(lr <= 0 for _, lr in v):
            raise ValueError(f"lr_schedule must be [(0, lr), (later iteration, lr), ...] with increasing "
                             f"iterations and positive lrs, got {v}")
        return v

    def lr_at(self, iteration: int) -> float:
        return [lr for start, lr in self.lr_schedule if start <= iteration][-1]


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@register("ast")
class AST(Method):
    """Adaptive search-and-training with ThreshNet; one :meth:`step` = one search-train-map iteration."""

    Hparams = ASTHparams
    smoke: ClassVar[dict] = {"max_iterations": 3, "epochs_per_iteration": 1, "batch_size": 64, "top_k": 2}

    def __init__(self, ctx: RunContext, hparams: ASTHparams | dict[str, Any] | None = None) -> None:
        super().__init__(ctx, hparams)
        hp: ASTHparams = self.hp
        if hp.search_kd_weight > 0 and ctx.teacher is None:
            raise ValueError("ast: search_kd_weight > 0 needs a teacher (ctx.teacher); set it or use search_kd_weight=0")
        self.spec, self.input_size = ctx.spec, ctx.input_size
        self.groups = models.channel_groups(self.spec)
        self.min_widths = ctx.budget.min_widths(self.spec)
        self.divisors = {g.name: g.divisor for g in self.groups}
        self.full_macs = models.macs(self.spec, self.input_size)
        self.target_macs = ctx.budget.target_macs(self.spec, self.input_size)
        self.search_train, self.search_val = ctx.search_split(hp.val_fraction)
        # Private randomness: α init, Gumbel noise, actions and per-iteration seeds all come from
        # this generator (global RNG is never read), so a resumed run replays exactly.
        self.gen = torch.Generator().manual_seed(derive_seed("ast", ctx.seed))
        self.target = self._initial_target()
        self.alpha: Alpha = {g.name: torch.rand(g.width, generator=self.gen) for g in self.groups}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("ast-policy", ctx.seed))
            self.policy = ThreshNet(len(hp.actions))
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=hp.policy_lr)
        self.baseline = MovingBaseline()
        self.convergence = ConvergenceTracker(hp.convergence_jaccard, hp.convergence_macs, hp.convergence_patience)
        self.iteration = 0
        self.kept_history: list[Keep] = []
        self.top: list[tuple[SubnetRecord, dict[str, torch.Tensor]]] = []  # best first

    # -- setup ---------------------------------------------------------------------------------
    def _initial_target(self) -> dict[str, torch.Tensor]:
        """The target net's state: random (cold start), the teacher's or a checkpoint's weights."""
        state = models.build(self.spec, seed=derive_seed("ast-target", self.ctx.seed)).state_dict()
        source = self.hp.warm_start
        if source is None:
            return state
        if source == "teacher":
            if self.ctx.teacher is None:
                raise ValueError("ast: warm_start='teacher' needs ctx.teacher; pass a teacher or a checkpoint path")
            loaded = self.ctx.teacher.state_dict()
        else:
            loaded = load_checkpoint(source)
            loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        missing = sorted(set(state) ^ set(loaded))
        if missing or any(loaded[k].shape != v.shape for k, v in state.items()):
            raise SpecError(f"ast: warm_start {source!r} does not match the full spec "
                            f"(first differing key: {missing[0] if missing else 'a tensor shape'}); "
                            f"warm-start from weights of the unpruned {self.spec['family']} spec")
        return {k: loaded[k].detach().cpu().clone() for k in state}

    @property
    def done(self) -> bool:
        return self.iteration >= self.hp.max_iterations or self.convergence.converged

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> StepResult:
        if self.done:
            raise RuntimeError("ast: the search is finished (converged or max_iterations reached); call finalize()")
        t, hp = self.iteration, self.hp
        taus, profiles, depths, actions = self._choose_thresholds()
        keep, redraws, shrunk = self._sample_within_budget(taus)
        sub_spec, sub_state = extract_subnet(self.spec, self.target, keep)
        sub_alpha = {g: self.alpha[g][k].clone() for g, k in keep.items()}
        net, train_loss = self._train_subnet(sub_spec, sub_state, sub_alpha, t)
        val = evaluate(net, self.search_val, device=self.ctx.device)
        macs = models.macs(sub_spec, self.input_size)
        reward = -float(val["loss"]) - hp.beta * macs / self.full_macs
        advantage = self.baseline.update(reward)
        if hp.threshnet:
            reinforce_step(self.policy, self.policy_opt, profiles, depths, actions, advantage)
        trained = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        sub_alpha = {g: a.detach().cpu() for g, a in sub_alpha.items()}
        record = SubnetRecord.of(sub_spec, {"val_top1": val["top1"], "val_loss": val["loss"]}, self.name, t,
                                 self.input_size, iteration=t, redraws=redraws, shrunk=shrunk,
                                 mean_tau=sum(taus.values()) / len(taus))
        self._remember(record, fold_alpha(trained, alpha_sites(sub_spec, hp.alpha_position, self.input_size),
                                          sub_alpha))
        map_back(self.spec, self.target, self.alpha, keep, trained, sub_alpha)
        min_jaccard = self.convergence.min_jaccard_to_previous(keep)  # how close to the stop rule
        self.convergence.update(keep, macs)
        self.kept_history.append(keep)
        self.iteration = self.steps_done = t + 1
        metrics = {"iteration": float(t), "macs": float(macs), "macs_ratio": macs / self.full_macs,
                   "val_top1": float(val["top1"]), "val_loss": float(val["loss"]), "train_loss": train_loss,
                   "reward": reward, "baseline": float(self.baseline.value), "mean_tau": record.source["mean_tau"],
                   "redraws": float(redraws), "shrunk": float(shrunk), "min_jaccard": min_jaccard,
                   "converged": float(self.convergence.converged)}
        return StepResult(step=t, metrics=metrics, subnets=[record], done=self.done)

    def _choose_thresholds(self) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-group τ from ThreshNet (sampled from its policy) or the fixed threshold."""
        profiles, depths = policy_inputs(self.alpha)
        if not self.hp.threshnet:
            actions = torch.zeros(len(self.alpha), dtype=torch.long)
            return {g: self.hp.fixed_threshold for g in self.alpha}, profiles, depths, actions
        with torch.no_grad():
            probs = torch.softmax(self.policy(profiles, depths), dim=1)
        actions = torch.multinomial(probs, 1, generator=self.gen).view(-1)
        taus = {g: float(self.hp.actions[a]) for g, a in zip(self.alpha, actions.tolist())}
        return taus, profiles, depths, actions

    def _sample_within_budget(self, taus: dict[str, float]) -> tuple[Keep, int, bool]:
        """Draw a subnet; above the FLOPs target re-draw with lower τ, then shrink if still above.
        Returns (keep, re-draws used, whether it was shrunk)."""
        for redraw in range(MAX_REDRAWS + 1):
            keep = sample_keep(self.alpha, lowered(taus, redraw), self.gen, self.hp.gumbel_scale,
                               self.min_widths, self.divisors)
            if models.macs(subnet_spec(self.spec, keep), self.input_size) <= self.target_macs:
                return keep, redraw, False
        keep = shrink_to_budget(self.spec, keep, self.alpha, self.target_macs, self.min_widths, self.input_size,
                                self.divisors)
        return keep, MAX_REDRAWS, True

    def _train_subnet(self, sub_spec: Spec, sub_state: dict[str, torch.Tensor], sub_alpha: Alpha,
                      t: int) -> tuple[nn.Module, float]:
        """Weights for ``epochs_per_iteration`` on search-train, then one α pass on search-val.
        ``sub_alpha`` is updated in place; returns the trained net (α hooks attached) and its
        last training loss."""
        hp, device = self.hp, self.ctx.device
        net = models.build(sub_spec, seed=0)
        net.load_state_dict(sub_state)
        net.to(device)
        for g in sub_alpha:
            sub_alpha[g] = sub_alpha[g].to(device)
        # The hooks read sub_alpha at call time, so they follow the α pass's updates; the net
        # is evaluated with them and then discarded.
        attach_alpha(net, alpha_sites(sub_spec, hp.alpha_position, self.input_size), sub_alpha)
        cfg = TrainConfig(epochs=hp.epochs_per_iteration, batch_size=hp.batch_size, lr=hp.lr_at(t),
                          momentum=hp.momentum, nesterov=False, weight_decay=hp.weight_decay, schedule="cosine",
                          kd_weight=hp.search_kd_weight, kd_temperature=self.ctx.kd_temperature)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
        history = fit(net, self.search_train, cfg, device=device, seed=seed, progress=False,
                      teacher=self.ctx.teacher if hp.search_kd_weight > 0 else None)
        self._alpha_pass(net, sub_alpha, seed)
        return net, float(history[-1]["loss"]) if history else float("nan")

    def _alpha_pass(self, net: nn.Module, sub_alpha: Alpha, seed: int) -> None:
        """One SGD pass over search-val updating only α with ``CE − var_weight·mean_l Var(α_l)``.
        BN running statistics are restored afterwards so they only ever see search-train."""
        hp = self.hp
        buffers = {k: v.clone() for k, v in net.named_buffers()}
        weights = [p for p in net.parameters() if p.requires_grad]
        for p in weights:
            p.requires_grad_(False)
        leaves = {g: a.detach().clone().requires_grad_(True) for g, a in sub_alpha.items()}
        sub_alpha.update(leaves)
        opt = torch.optim.SGD(list(leaves.values()), lr=hp.alpha_lr, momentum=ALPHA_MOMENTUM,
                              weight_decay=ALPHA_WEIGHT_DECAY)
        net.train()
        for x, y in make_loader(self.search_val, hp.batch_size, train=True, device=self.ctx.device, seed=seed,
                                drop_last=False):
            loss = F.cross_entropy(net(x), y) - hp.var_weight * alpha_variance(leaves)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for g, a in leaves.items():
            sub_alpha[g] = a.detach()
        for p in weights:
            p.requires_grad_(True)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])

    def _remember(self, record: SubnetRecord, folded: dict[str, torch.Tensor]) -> None:
        """Keep the top-k records (search-val top-1, then lower loss, then earlier) with weights."""
        self.top.append((record, folded))
        self.top.sort(key=lambda rs: (-rs[0].metrics["val_top1"], rs[0].metrics["val_loss"], rs[0].step))
        del self.top[self.hp.top_k:]

    # -- results -------------------------------------------------------------------------------
    def best(self) -> SubnetRecord:
        if not self.top:
            raise RuntimeError("ast: no subnet sampled yet; call step() first")
        return self.top[0][0]

    def initial_weights(self, record: SubnetRecord) -> dict[str, torch.Tensor] | None:
        """The record's inherited weights (α folded in) when it is one of the top-k, else None."""
        for rec, state in self.top:
            if rec.step == record.step and rec.key == record.key:
                return {k: v.clone() for k, v in state.items()}
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "target": {k: v.clone() for k, v in self.target.items()},
            "alpha": {g: a.clone() for g, a in self.alpha.items()},
            "policy": self.policy.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "baseline": self.baseline.value,
            "generator": self.gen.get_state(),
            "convergence": self.convergence.state_dict(),
            "kept_history": [{g: k.clone() for g, k in keep.items()} for keep in self.kept_history],
            "top": [{"record": rec.to_dict(), "state": state} for rec, state in self.top],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = self.steps_done = int(state["iteration"])
        self.target = {k: v.clone() for k, v in state["target"].items()}
        self.alpha = {g: a.clone() for g, a in state["alpha"].items()}
        self.policy.load_state_dict(state["policy"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.baseline.value = state["baseline"]
        self.gen.set_state(state["generator"])
        self.convergence.load_state_dict(state["convergence"])
        self.kept_history = list(state["kept_history"])
        self.top = [(SubnetRecord.from_dict(t["record"]), t["state"]) for t in state["top"]]


@torch.no_grad()
def map_back(spec: Spec, target: dict[str, torch.Tensor], alpha: Alpha, keep: Keep,
             sub_state: Mapping[str, torch.Tensor], sub_alpha: Mapping[str, torch.Tensor]) -> None:
    """Write a trained subnet's weights, BN statistics and α into the target net at ``keep``."""
    write_back(spec, target, keep, sub_state)
    for g, idx in keep.items():
        alpha[g][idx] = sub_alpha[g].to(alpha[g].dtype)
