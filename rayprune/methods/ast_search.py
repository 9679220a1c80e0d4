"""AST's search loop: Adaptive Search-and-Training with ThreshNet (Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023).

Every channel of every channel group gets a learnable importance weight α
(:mod:`~rayprune.methods.ast_alpha`). One search iteration (one :meth:`AST.step`):

1. **Thresholds.** ThreshNet, a small width-agnostic policy, picks a mass threshold τ_l per
   channel group from ``actions`` (or a fixed τ without ThreshNet, the paper's ablation).
2. **Sample.** Per group count the fewest channels whose ``softmax(α + s_t·Gumbel)`` mass
   reaches τ_l, scale every count by one global factor found by bisection so the subnet lands in
   ``[target_window·target, target]`` MACs, never below the budget's per-group floor, and keep
   each group's most probable channels (:func:`~rayprune.methods.ast_convergence.calibrate_to_target`).
   The noise scale s_t anneals linearly to 0.
3. **Train.** Slice the subnet out of the target net and train its weights on search-train for
   the iteration's M epochs (engine ``fit``), with ``alpha_passes`` passes of α on search-val
   (``CE − var_weight·Σ_l Var(α_l)``) spread over them.
4. **Reward.** ``r = −val_loss − β·MACs/MACs_full``; one REINFORCE step of ThreshNet against a
   moving-average baseline.
5. **Map back.** Write the subnet's weights, BN statistics and α into the target net.
6. **Judge.** Draw the *deterministic* subnet (ThreshNet's most likely τ, no noise, same
   calibration) and compare it with the previous iteration's
   (:class:`~rayprune.methods.ast_convergence.ConvergenceTracker`).

Once the deterministic subnet has converged (or after ``max_iterations``), one last step trains
it like any sample and scores it on search-val; it is the method's result (never chosen on
test). ``finalize`` fine-tunes it from its inherited weights (α folded in): CE in the efficient
mode, KD from ``ctx.teacher`` in the robust mode. The deviations from the released code are
listed, with their reasons, in the docstring of :class:`ASTHparams`.

**The budget.** The FLOPs target fixes the calibration window (step 2); the per-stage maximum
rates are hard floors on every group's width (``ctx.budget.min_widths``); an ``allocation`` is not
used (ThreshNet and α decide how the pruning spreads over the stages).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import models
from ..engine.checkpoint import safe_load
from ..engine.train import TrainConfig, evaluate, fit
from ..engine.utils import derive_seed
from ..errors import InputError
from ..models.base import Spec, SpecError
from ..models.transfer import extract_subnet, write_back
from .ast_alpha import (
    Alpha,
    AlphaOptimizer,
    MovingBaseline,
    ThreshNet,
    alpha_pass,
    alpha_pass_counts,
    alpha_sites,
    attach_alpha,
    choose_thresholds,
    fold_alpha,
    initial_alpha,
    mean_alpha_entropy,
    mean_policy_entropy,
    reinforce_step,
)
from .ast_convergence import Calibrated, ConvergenceTracker, Keep, calibrate_to_target, group_macs, rank_channels
from .ast_hparams import ASTHparams
from .base import Method, MethodHparams, RunContext, StepResult, SubnetRecord


@dataclass
class Trained:
    """A trained subnet: its record and its weights with α folded in (what finalize starts from)."""

    record: SubnetRecord
    state: dict[str, torch.Tensor]


class AST(Method):
    """Adaptive search-and-training with ThreshNet.

    One :meth:`step` is one search-train-map iteration; once the stop rule holds, one last step
    trains the deterministic subnet (``select='deterministic'``) and the search is done.
    """

    name = "ast"
    Hparams: ClassVar[type[MethodHparams]] = ASTHparams
    hp: ASTHparams
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
        hp = self.hp
        if hp.search_kd_weight > 0 and ctx.teacher is None:
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
        state = self.ctx.unpruned_net(derive_seed("ast-target", self.ctx.seed)).state_dict()
        source = self.hp.warm_start
        if source is None:
            return state
        if source == "teacher":
            if self.ctx.teacher is None:
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
        # A subnet whose training diverged (a non-finite val loss) teaches the policy nothing, and
        # a NaN advantage would turn every ThreshNet weight into NaN for the rest of the search.
        if math.isfinite(reward):
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
            "baseline": math.nan if self.baseline.value is None else float(self.baseline.value),
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
            {g.name: g.tiles for g in self.groups},
        )

    def _choose_thresholds(self, greedy: bool) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-group τ from ThreshNet, or the fixed threshold when it is off (see :func:`choose_thresholds`)."""
        policy = self.policy if self.hp.threshnet else None
        return choose_thresholds(policy, self.hp.actions, self.alpha, self.gen, greedy, self.hp.fixed_threshold)

    def policy_entropy(self) -> float:
        """ThreshNet's mean per-group entropy, normalised to [0, 1] (1: uniform over the actions)."""
        if not self.hp.threshnet or len(self.hp.actions) < 2:
            return 0.0
        return mean_policy_entropy(self.policy, self.alpha)

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
            if alpha_opt is None:
                return
            for i in range(passes[int(entry["epoch"])]):
                pass_seed = seed + 7919 * (int(entry["epoch"]) + 1) + i
                alpha_pass(net, alpha_opt, self.search_val, hp.batch_size, device, hp.var_weight, pass_seed)

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
