"""AST's α and its ThreshNet threshold policy (AST / ThreshNet, Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023).

**α.** Every channel of every channel group has a learnable importance weight α. α enters the
forward pass through forward hooks that scale a channel group's output at every producer of the
group: after its BatchNorm by default (``alpha_position="post_bn"``), or on the conv output before
BN (``"pre_bn"``, the reference code's placement, where BN largely cancels it). The hook sites are
derived from the family's layer walk and ``tensor_axes``, so the method works for every family
(cifar_resnet, vgg, mobilenet_v2, ...). α is trained on search-val (``CE − var_weight·Σ_l Var(α_l)``)
by :class:`AlphaOptimizer`, and folded into the weights for the fine-tune (:func:`fold_alpha`).

**ThreshNet.** A small width-agnostic policy picks a mass threshold τ_l per channel group from
``actions`` (:func:`choose_thresholds`), reading each group's sorted ``softmax(α)`` profile. It
learns by REINFORCE from ``r = −val_loss − β·MACs/MACs_full`` against a moving-average baseline
(:class:`MovingBaseline`, :func:`reinforce_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..engine.data import make_loader
from ..models.base import Spec, SpecError
from .ast_convergence import Keep

Alpha = dict[str, torch.Tensor]  # channel group -> per-channel importance weights

ACTIONS = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85)
POLICY_INPUT = 64  # every group's α profile is resampled to this many values
POLICY_HIDDEN = 32
ALPHA_BETAS, ALPHA_WEIGHT_DECAY = (0.5, 0.999), 1e-4  # α's Adam (see AlphaOptimizer)

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
        bn = nxt if nxt is not None and nxt.kind == "bn" and axes.get(f"{nxt.name}.weight") == (group,) else None
        sites.append(AlphaSite(bn.name if (bn is not None and position == "post_bn") else layer.name, group))
    return sites


def _channel_view(a: torch.Tensor, ndim: int) -> torch.Tensor:
    return a.view(1, -1, *([1] * (ndim - 2)))


def attach_alpha(net: nn.Module, sites: Sequence[AlphaSite], alpha: Mapping[str, torch.Tensor]) -> list[Any]:
    """Register forward hooks that multiply each site's output by its group's α (looked up in
    ``alpha`` at call time). Returns the hook handles (``handle.remove()`` detaches)."""
    modules = dict(net.named_modules())

    def hook_for(group: str) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
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
    whatever the depth of the net (averaged, it is inert over ResNet-56's 30 groups)."""
    return torch.stack([a.var(correction=0) for a in alpha.values()]).sum()


# --------------------------------------------------------------------------------------------
# Training α
# --------------------------------------------------------------------------------------------


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
        """One Adam step of α on ``loss``."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def write_to(self, sub_alpha: Alpha) -> None:
        """Put the trained α (detached) into ``sub_alpha``."""
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


def alpha_pass_counts(epochs: int, passes: int) -> list[int]:
    """α passes after each of ``epochs`` weight epochs: ``passes`` in all, evenly spread (the
    reference interleaves one every M/5 epochs); with fewer epochs than passes some epochs are
    followed by several.

    >>> alpha_pass_counts(40, 5)[:9], alpha_pass_counts(2, 5)
    ([0, 0, 0, 0, 0, 0, 0, 1, 0], [2, 3])
    """
    return [(e + 1) * passes // epochs - e * passes // epochs for e in range(epochs)]


def alpha_pass(
    net: nn.Module,
    alpha_opt: AlphaOptimizer,
    data: Any,
    batch_size: int,
    device: str | torch.device,
    var_weight: float,
    seed: int,
) -> None:
    """One pass over ``data`` (search-val) updating only α with ``CE − var_weight·Σ_l Var(α_l)``.
    BN running statistics are restored afterwards so they only ever see search-train."""
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    weights = [p for p in net.parameters() if p.requires_grad]
    for p in weights:
        p.requires_grad_(False)
    was_training = net.training
    net.train()
    for x, y in make_loader(data, batch_size, train=True, device=device, seed=seed, drop_last=False):
        loss = F.cross_entropy(net(x).float(), y) - var_weight * alpha_variance(alpha_opt.whole_groups())
        alpha_opt.step(loss)
    net.train(was_training)
    for p in weights:
        p.requires_grad_(True)
    with torch.no_grad():
        for k, v in net.named_buffers():
            v.copy_(buffers[k])


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


def choose_thresholds(
    policy: ThreshNet | None,
    actions: Sequence[float],
    alpha: Mapping[str, torch.Tensor],
    gen: torch.Generator,
    greedy: bool,
    fixed_threshold: float,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group τ from ThreshNet (sampled from its policy, or its most likely action) or, with no
    policy, ``fixed_threshold`` everywhere; also the policy's inputs and the actions taken, which
    :func:`reinforce_step` needs."""
    profiles, depths = policy_inputs(alpha)
    if policy is None:
        chosen = torch.zeros(len(alpha), dtype=torch.long)
        return {g: fixed_threshold for g in alpha}, profiles, depths, chosen
    with torch.no_grad():
        probs = torch.softmax(policy(profiles, depths), dim=1)
    chosen = probs.argmax(dim=1) if greedy else torch.multinomial(probs, 1, generator=gen).view(-1)
    taus = {g: float(actions[a]) for g, a in zip(alpha, chosen.tolist(), strict=True)}
    return taus, profiles, depths, chosen


def mean_policy_entropy(policy: ThreshNet, alpha: Mapping[str, torch.Tensor]) -> float:
    """ThreshNet's mean per-group entropy over its actions, normalised to [0, 1] (1: uniform)."""
    with torch.no_grad():
        p = torch.softmax(policy(*policy_inputs(alpha)), dim=1)
    return float((-(p * p.clamp_min(1e-12).log()).sum(1) / math.log(p.shape[1])).mean())
