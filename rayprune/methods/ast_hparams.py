"""AST's hyperparameters: every field a search-space key, the ``fast`` and ``paper`` schedule presets,
and where AST departs from the released code (AST / ThreshNet, Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023).
The search loop that reads them is :mod:`rayprune.methods.ast_search`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..grid import WINDOW_LOW
from .ast_alpha import ACTIONS
from .base import MethodHparams

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
    * every subnet is drawn to the FLOPs target (one global width scale,
      :func:`~rayprune.methods.ast_convergence.calibrate_to_target`), never below the budget's per-group floor;
    * the search stops when AST's deterministic subnet converges
      (:class:`~rayprune.methods.ast_convergence.ConvergenceTracker`), and that subnet, trained like any sample
      and scored on search-val, is the result.

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
    target_window: float = Field(WINDOW_LOW, gt=0.0, le=1.0, description="subnets land in [window·target, target] MACs")
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
