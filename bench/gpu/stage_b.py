"""Stage B: real accuracy at reduced scale on the full CIFAR-10.

A teacher (the unpruned net) is trained first; then every arm of :data:`ARMS` runs through the
public method API -- ``get_method(name)(RunContext(...), hparams)``, ``step()`` until ``done``,
``finalize()`` -- with the **same fine-tune epoch count** and the same KD setting
(:data:`KD_WEIGHT` from the teacher, temperature :data:`KD_TEMPERATURE`). Each arm's row: test
top-1, robust top-1, MACs %, wall seconds, the fine-tune recipe actually used, the steps run,
and the subnet's spec (stage C times it).

Sizing: the schedule is the largest entry of :data:`SIZES` whose estimated cost (in units of one
ResNet-20 training epoch on this device, :data:`COSTS`) fits the wall budget. The epoch time
comes from stage A's calibration (saved on the device), ``--epoch-time-s``, or a conservative
default; after the teacher, the measured epoch time re-sizes the arms. Arms run in the order
given (most important first); an arm that no longer fits is recorded as skipped, and a search
that runs over its share stops early (``truncated``) so that its fine-tune still fits.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# ==================================== STAGE-B SETTINGS ====================================
# Edit here. Values "$key" are taken from the chosen SIZES entry; "$ran:ARM" is the number of
# search steps the arm ARM actually ran (the random-search arm repeats the full AST's count).
MODEL = "cifar_resnet:20"
SHORTCUT = "avgpool_conv"  # methods that inherit weights refuse option_a
FLOPS_TARGET = 0.5
KD_WEIGHT = 0.9  # robust mode: every arm's fine-tune distils from the teacher ...
KD_TEMPERATURE = 4.0  # ... at this temperature
SEED = 0
TEACHER_RECIPE = {"batch_size": 128, "lr": 0.1, "schedule": "cosine", "weight_decay": 5e-4}
FINETUNE_RECIPE = {"batch_size": 128, "lr": 0.1, "schedule": "cosine", "weight_decay": 5e-4}
# True: a method's own finetune_defaults (e.g. AST/l1: lr 0.01 from inherited weights) override
# FINETUNE_RECIPE, as `rayprune run` does; the epoch count and KD stay the same for every arm.
USE_METHOD_FINETUNE_DEFAULTS = False

SIZES = {  # from largest to smallest; the first whose estimate fits the budget is used
    "XL": {"teacher_epochs": 40, "finetune_epochs": 20, "ast_iterations": 8, "ast_epochs": 1, "tas_epochs": 10},
    "L": {"teacher_epochs": 30, "finetune_epochs": 15, "ast_iterations": 6, "ast_epochs": 1, "tas_epochs": 8},
    "M": {"teacher_epochs": 20, "finetune_epochs": 10, "ast_iterations": 5, "ast_epochs": 1, "tas_epochs": 6},
    "S": {"teacher_epochs": 12, "finetune_epochs": 6, "ast_iterations": 4, "ast_epochs": 1, "tas_epochs": 4},
    "XS": {"teacher_epochs": 6, "finetune_epochs": 3, "ast_iterations": 3, "ast_epochs": 1, "tas_epochs": 2},
    "XXS": {"teacher_epochs": 2, "finetune_epochs": 1, "ast_iterations": 2, "ast_epochs": 1, "tas_epochs": 1},
}
SMOKE_SIZE = {"teacher_epochs": 1, "finetune_epochs": 1, "ast_iterations": 2, "ast_epochs": 1, "tas_epochs": 1}

AST_SCHEDULE = {
    "max_iterations": "$ast_iterations",
    "min_iterations": "$ast_iterations",
    "epochs_schedule": [[0, "$ast_epochs"]],
    "noise_iterations": "$ast_iterations",
}
ARMS = [  # run in this order: most important first
    {"arm": "uniform", "method": "uniform", "hparams": {"eval_epochs": 1}},
    {"arm": "ast", "method": "ast", "hparams": {**AST_SCHEDULE}},
    {
        "arm": "ast_random",
        "method": "ast",
        "hparams": {
            **AST_SCHEDULE,
            "freeze_alpha": True,
            "threshnet": False,
            "stop_on_convergence": False,
            "max_iterations": "$ran:ast",
            "min_iterations": "$ran:ast",
        },
    },
    {"arm": "l1", "method": "l1", "hparams": {}},
    {"arm": "tas", "method": "tas", "hparams": {"epochs": "$tas_epochs"}},
]

# Estimated costs in units of E = one 50k-image training epoch of the unpruned MODEL (engine,
# bf16 + channels_last). Rough guesses; the teacher's measured epoch re-scales E, and every arm
# checks the clock between search steps.
COSTS = {
    "teacher_epoch": 1.0,
    "finetune_epoch": 1.35,  # the pruned net is launch-bound (not 2x faster) and KD adds the teacher's forward
    "measure": 0.5,  # test + 6 corruptions + latency after the fine-tune
    "uniform_search": 1.0,  # eval_epochs on 90 % of the data + search-val
    "ast_iteration": 2.2,  # per iteration at 1 epoch: search-train (80 %) + 5 alpha passes + scoring (H200: 2.1)
    "l1_search": 0.3,  # BN recalibration + search-val
    "tas_epoch": 2.0,  # 50/50 halves, weight + arch step per batch through the mixture net (H200: 1.8 measured)
}
DEFAULT_EPOCH_S = 6.0  # used without calibration: deliberately pessimistic for an H100/H200
# ==========================================================================================


def resolve(value: Any, size: dict[str, int], ran: dict[str, int]) -> Any:
    if isinstance(value, str) and value.startswith("$ran:"):
        return ran.get(value[5:], size["ast_iterations"])
    if isinstance(value, str) and value.startswith("$"):
        return size[value[1:]]
    if isinstance(value, list):
        return [resolve(v, size, ran) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, size, ran) for k, v in value.items()}
    return value


def arm_hparams(arm: dict[str, Any], size: dict[str, int], ran: dict[str, int], smoke: bool) -> dict[str, Any]:
    from rayprune.methods import get_method

    hp = resolve(arm["hparams"], size, ran)
    if smoke:  # the method's seconds-long settings underneath the arm's own keys
        hp = {**get_method(arm["method"]).smoke, **hp}
    return hp


def finetune_recipe(method: str, epochs: int) -> dict[str, Any]:
    from rayprune.methods import get_method

    recipe = dict(FINETUNE_RECIPE)
    if USE_METHOD_FINETUNE_DEFAULTS:
        recipe.update(getattr(get_method(method), "finetune_defaults", {}) or {})
    recipe["epochs"] = epochs
    return recipe


def validate_config(smoke: bool = False) -> list[str]:
    """Every arm's hyperparameters and recipe, validated as stage B will build them. Returns
    one line per problem (empty: all fine). Preflight runs this in command 1."""
    from rayprune.engine.train import TrainConfig
    from rayprune.methods import get_method

    problems = []
    sizes = [SMOKE_SIZE] if smoke else list(SIZES.values())
    try:
        TrainConfig(**{**TEACHER_RECIPE, "epochs": sizes[0]["teacher_epochs"]})
    except Exception as e:
        problems.append(f"TEACHER_RECIPE: {_one_line(e)}")
    for arm in ARMS:
        for size in (sizes[0], sizes[-1]):
            try:
                cls = get_method(arm["method"])
                cls.Hparams(**arm_hparams(arm, size, {}, smoke))
                TrainConfig(
                    **finetune_recipe(arm["method"], size["finetune_epochs"]),
                    kd_weight=KD_WEIGHT,
                    kd_temperature=KD_TEMPERATURE,
                )
            except Exception as e:
                problems.append(f"arm {arm['arm']} ({arm['method']}): {_one_line(e)}")
                break
    return problems


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:500]}"


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def arm_cost(arm: dict[str, Any], size: dict[str, int]) -> tuple[float, float]:
    """(search, fine-tune + measure) cost of one arm in epochs E."""
    m = arm["method"]
    if m == "uniform":
        search = COSTS["uniform_search"]
    elif m == "ast":
        # + 1: the full arm trains and scores its deterministic subnet after the last iteration
        search = (size["ast_iterations"] + 1) * size["ast_epochs"] * COSTS["ast_iteration"]
    elif m in ("l1", "fpgm"):
        search = COSTS["l1_search"]
    elif m == "tas":
        search = size["tas_epochs"] * COSTS["tas_epoch"]
    else:
        search = 2.0
    return search, size["finetune_epochs"] * COSTS["finetune_epoch"] + COSTS["measure"]


def plan_cost(size: dict[str, int], arms: list[dict[str, Any]], teacher: bool) -> float:
    total = size["teacher_epochs"] * COSTS["teacher_epoch"] + COSTS["measure"] if teacher else 0.0
    return total + sum(sum(arm_cost(a, size)) for a in arms)


def choose_size(
    epoch_s: float, budget_s: float, arms: list[dict[str, Any]], teacher_epochs: int | None = None
) -> tuple[str, dict[str, int], float]:
    """The largest SIZES entry whose estimate fits ``budget_s`` (the smallest when none does).
    With ``teacher_epochs`` (the teacher is done) only the arms are counted and it is kept."""
    name, size = list(SIZES.items())[-1]
    for n, s in SIZES.items():
        s = dict(s, teacher_epochs=teacher_epochs) if teacher_epochs is not None else s
        if plan_cost(s, arms, teacher_epochs is None) * epoch_s <= budget_s:
            name, size = n, dict(s)
            break
    if teacher_epochs is not None:
        size = dict(size, teacher_epochs=teacher_epochs)
    return name, dict(size), plan_cost(size, arms, teacher_epochs is None) * epoch_s


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train_teacher(
    spec: dict, train: Any, test: Any, device: str, epochs: int, smoke: bool, max_s: float = float("inf")
) -> tuple[Any, dict]:
    """Train the unpruned net; stops after the epoch that would run past ``max_s`` (``truncated``)."""
    from rayprune import models
    from rayprune.engine.latency import measure_latency
    from rayprune.engine.robust import robust_accuracy
    from rayprune.engine.train import TrainConfig, evaluate, fit

    cfg = TrainConfig(**{**TEACHER_RECIPE, "epochs": epochs})
    net = models.build(spec, seed=SEED)
    t0 = time.perf_counter()

    def over(entry: dict) -> bool:  # stop when one more epoch would end past max_s
        spent = time.perf_counter() - t0
        return spent * (entry["epoch"] + 2) / (entry["epoch"] + 1) > max_s

    history = fit(net, train, cfg, device=device, seed=SEED, progress=False, on_epoch=over)
    _sync(device)
    train_s = time.perf_counter() - t0
    test_m = evaluate(net, test, device=device)
    robust = robust_accuracy(net, test, device=device, seed=SEED, max_samples=64 if smoke else None)
    lat = measure_latency(
        net, (test.channels, test.input_size, test.input_size), device=device, repeats=3 if smoke else 20
    )
    net.eval()
    return net, {
        "test_top1": test_m["top1"],
        "test_top5": test_m["top5"],
        "robust_top1": robust["robust_top1"],
        "robust": {k: v for k, v in robust.items() if k != "robust_top1"},
        **lat,
        "train_s": train_s,
        "epoch_s_measured": train_s / max(1, len(history)),
        "epochs_run": len(history),
        "truncated": len(history) < epochs,
        "final_loss": history[-1]["loss"],
        "recipe": cfg.model_dump(),
    }


def run_arm(
    arm: dict[str, Any],
    hp: dict[str, Any],
    ctx_args: dict[str, Any],
    epoch_s: float,
    size: dict[str, int],
    left: Callable[[], float],
    reserve_s: float,
) -> dict[str, Any]:
    """One arm through the public API; returns its row (``error`` set on failure)."""
    from rayprune import models
    from rayprune.engine.train import TrainConfig
    from rayprune.methods import Budget, RunContext, get_method
    from rayprune.methods.finetune import finalize

    t0 = time.perf_counter()
    recipe = finetune_recipe(arm["method"], size["finetune_epochs"])
    workdir = Path(tempfile.mkdtemp(prefix=f"gpukit-{arm['arm']}-"))
    row: dict[str, Any] = {"arm": arm["arm"], "method": arm["method"], "hparams": hp, "finetune_request": recipe}
    search_est, ft_est = (c * epoch_s for c in arm_cost(arm, size))
    row.update(est_search_s=search_est, est_finetune_s=ft_est)
    try:
        cls = get_method(arm["method"])
        ctx = RunContext(
            **ctx_args, budget=Budget(flops_target=FLOPS_TARGET), workdir=workdir, finetune=TrainConfig(**recipe)
        )
        method = cls(ctx, hp)
        steps, truncated, last_metrics = 0, False, {}
        ts = time.perf_counter()
        while not method.done:
            if steps:
                per_step = (time.perf_counter() - ts) / steps
                over_share = time.perf_counter() - ts + per_step > 1.5 * search_est + 10
                no_room = left() - reserve_s < per_step + ft_est
                if over_share or no_room:
                    truncated = True
                    break
            result = method.step()
            last_metrics = result.metrics
            steps += 1
        _sync(ctx.device)
        search_s = time.perf_counter() - ts
        tf = time.perf_counter()
        final = finalize(method, progress=False)
        _sync(ctx.device)
        finetune_s = time.perf_counter() - tf
        rec = final.record
        full_macs = models.macs(ctx.spec, ctx.input_size)
        m = rec.metrics
        row.update(
            test_top1=m.get("test_top1"),
            test_top5=m.get("test_top5"),
            robust_top1=m.get("robust_top1"),
            val_top1=m.get("val_top1"),
            macs=rec.macs,
            macs_pct=100.0 * rec.macs / full_macs,
            params=rec.params,
            steps_run=steps,
            iterations=int(getattr(method, "iteration", steps)),
            truncated=truncated,
            search_s=search_s,
            finetune_s=finetune_s,
            recipe=rec.source.get("recipe", recipe),
            recipe_tag=rec.source.get("recipe_tag"),
            init=rec.source.get("init"),
            kd_weight=ctx.kd_weight,
            kd_temperature=ctx.kd_temperature,
            latency={k: v for k, v in m.items() if k.startswith("latency_")},
            robust={k: v for k, v in m.items() if k.startswith("robust/")},
            last_step={k: v for k, v in last_metrics.items() if isinstance(v, (int, float))},
            spec=rec.spec,
        )
    except Exception as e:
        row.update(error=_one_line(e), traceback=traceback.format_exc()[-2000:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    return row


def stage_b(
    train: Any,
    test: Any,
    device: str,
    emit: Callable[..., Any],
    *,
    left: Callable[[], float],
    epoch_s: float | None,
    epoch_source: str,
    smoke: bool = False,
    reserve_s: float = 20.0,
    model: str | None = None,
    data_info: dict[str, Any] | None = None,
    kd_weight: float | None = None,
) -> list[dict[str, Any]]:
    """Teacher, then ARMS in order. Returns the rows (teacher first) for stage C."""
    from rayprune import models

    model = model or MODEL
    kd = KD_WEIGHT if kd_weight is None else kd_weight
    spec = models.full_spec(model, num_classes=train.num_classes, shortcut=SHORTCUT)
    common = {
        "model": model,
        "shortcut": SHORTCUT,
        "flops_target": FLOPS_TARGET,
        "seed": SEED,
        **({"data": data_info} if data_info else {}),
    }
    epoch_s = epoch_s or DEFAULT_EPOCH_S
    if smoke:
        size_name, size, est = "smoke", dict(SMOKE_SIZE), 0.0
    else:
        size_name, size, est = choose_size(epoch_s, left() - reserve_s, ARMS)
    emit(
        kind="plan",
        size=size_name,
        sizes=size,
        epoch_s=epoch_s,
        epoch_source=epoch_source,
        est_total_s=est,
        budget_left_s=left(),
        kd_weight=kd,
        kd_temperature=KD_TEMPERATURE,
        arms=[a["arm"] for a in ARMS],
        **common,
    )
    # The teacher may overrun its estimate by half (+10 s) before it stops early.
    t_max = math.inf if smoke else 1.5 * size["teacher_epochs"] * COSTS["teacher_epoch"] * epoch_s + 10
    teacher, t_metrics = train_teacher(spec, train, test, device, size["teacher_epochs"], smoke, t_max)
    t_macs = models.macs(spec, train.input_size)
    rows = [
        emit(
            kind="arm",
            arm="teacher",
            method="unpruned",
            macs=t_macs,
            macs_pct=100.0,
            params=models.params(spec),
            epochs=size["teacher_epochs"],
            spec=spec,
            wall_s=t_metrics["train_s"],
            **t_metrics,
            **common,
        )
    ]
    if not smoke:  # re-size the arms from the measured epoch time
        epoch_s = t_metrics["epoch_s_measured"]
        size_name, size, est = choose_size(epoch_s, left() - reserve_s, ARMS, teacher_epochs=size["teacher_epochs"])
        emit(
            kind="replan",
            size=size_name,
            sizes=size,
            epoch_s=epoch_s,
            epoch_source="teacher",
            est_arms_s=est,
            budget_left_s=left(),
            **common,
        )
    ctx_args = {
        "spec": spec,
        "train": train,
        "test": test,
        "kd_weight": kd,
        "teacher": teacher,
        "device": device,
        "seed": SEED,
        "kd_temperature": KD_TEMPERATURE,
        "input_size": train.input_size,
        "progress": False,
        "measure_latency": True,
        "robust": True,
    }
    if smoke:
        ctx_args.update(latency_batch_sizes=(1,), latency_repeats=3, robust_max_samples=64)
    ran: dict[str, int] = {}
    for arm in ARMS:
        need = sum(arm_cost(arm, size)) * epoch_s
        if not smoke and left() - reserve_s < 0.6 * need:
            rows.append(
                emit(
                    kind="skipped",
                    arm=arm["arm"],
                    method=arm["method"],
                    reason="budget",
                    est_s=need,
                    budget_left_s=left(),
                    **common,
                )
            )
            continue
        try:
            hp = arm_hparams(arm, size, ran, smoke)
        except Exception as e:
            rows.append(emit(kind="arm", arm=arm["arm"], method=arm["method"], error=_one_line(e), **common))
            continue
        row = run_arm(arm, hp, ctx_args, epoch_s, size, left, reserve_s)
        if "iterations" in row:  # AST: search iterations (its final deterministic step not counted)
            ran[arm["arm"]] = row["iterations"]
        rows.append(emit(kind="arm", size=size_name, **row, **common))
    return rows
