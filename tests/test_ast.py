"""AST / ThreshNet: selection numbers, sampling, ThreshNet's learning signal, α hooks and folding,
map-back, convergence and the FLOPs-target constraint."""

from __future__ import annotations

import math

import pytest
import torch

from rayprune import models
from rayprune.engine.data import synthetic_dataset
from rayprune.engine.train import TrainConfig, evaluate
from rayprune.methods import Budget, RunContext, get_method, within_budget
from rayprune.methods.ast_alpha import (
    MovingBaseline,
    ThreshNet,
    alpha_pass_counts,
    alpha_sites,
    attach_alpha,
    fold_alpha,
    mean_alpha_entropy,
    policy_inputs,
    reinforce_step,
)
from rayprune.methods.ast_convergence import (
    ConvergenceTracker,
    calibrate_to_target,
    group_similarity,
    mass_threshold_keep,
    rank_channels,
)
from rayprune.methods.ast_hparams import PRESETS, ASTHparams
from rayprune.methods.ast_search import AST, map_back
from rayprune.models.transfer import extract_subnet, subnet_spec

TINY = {
    "cifar_resnet": ("cifar_resnet:tiny", {"shortcut": "avgpool_conv"}),
    "vgg": ("vgg:tiny", {}),
    "mobilenet_v2": ("mobilenet_v2:tiny", {}),
}


def tiny_spec(family: str = "cifar_resnet") -> dict:
    model, options = TINY[family]
    return models.full_spec(model, num_classes=4, **options)


def random_alpha(spec: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.width, generator=gen) for g in models.channel_groups(spec)}


def make_ctx(tmp_path, spec=None, budget=0.5, max_stage_prune=None) -> RunContext:
    spec = spec or tiny_spec()
    train, test = synthetic_dataset(n_train=160, n_test=64, num_classes=4, size=16, seed=0)
    return RunContext(
        spec=spec,
        train=train,
        test=test,
        budget=Budget(flops_target=budget, max_stage_prune=max_stage_prune),
        device="cpu",
        seed=5,
        workdir=tmp_path,
        finetune=TrainConfig(epochs=1, batch_size=32),
        input_size=16,
        progress=False,
    )


# -- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tau, kept", [(0.6, 10), (0.85, 14), (0.75, 12), (1.0, 16)])
def test_mass_threshold_reference_numbers(tau, kept):
    # The reference rule with uniform α and no noise: 16 filters keep ceil(tau * 16).
    uniform = torch.full((16,), 1 / 16)
    assert mass_threshold_keep(uniform, tau).numel() == kept
    ranking = rank_channels({"g": torch.zeros(16)}, None, 0.0)
    assert ranking["g"].order[:kept].tolist() == list(range(kept))  # ties keep the lowest indices first


def test_mass_threshold_keeps_the_heaviest_channels_in_ascending_order():
    probs = torch.tensor([0.1, 0.05, 0.3, 0.05, 0.5])
    assert mass_threshold_keep(probs, 0.8).tolist() == [2, 4]  # 0.5 + 0.3 reaches 0.8 exactly
    assert mass_threshold_keep(probs, 0.81).tolist() == [0, 2, 4]
    assert mass_threshold_keep(probs, 0.5, min_keep=4).tolist() == [0, 1, 2, 4]
    assert mass_threshold_keep(probs, 0.5, divisor=2).tolist() == [2, 4]


def draw(spec, alpha, target, taus=0.7, floors=None, gen=None, scale=0.0, window=0.9, size=16):
    floors = floors or Budget(flops_target=target).min_widths(spec)
    taus = {g: taus for g in alpha} if isinstance(taus, float) else taus
    divisors = {g.name: g.divisor for g in models.channel_groups(spec)}
    full = models.macs(spec, size)
    return calibrate_to_target(
        spec, rank_channels(alpha, gen, scale), taus, floors, divisors, int(target * full), window, size
    )


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("family", ["cifar_resnet", "vgg", "mobilenet_v2"])
def test_calibrated_subnets_land_in_the_target_window(family, target):
    spec = tiny_spec(family)
    full = models.macs(spec, 16)
    for seed in range(3):
        drawn = draw(spec, random_alpha(spec, seed), target, gen=torch.Generator().manual_seed(seed), scale=0.05)
        assert drawn.in_window and 0.9 * target * full <= drawn.macs <= target * full
        assert drawn.macs == models.macs(subnet_spec(spec, drawn.keep), 16)


def test_kept_sets_are_the_most_probable_channels_and_respect_the_floors():
    spec = tiny_spec()
    budget = Budget(flops_target=0.5, max_stage_prune=[0.25, 0.5, 0.75])
    floors = budget.min_widths(spec)
    assert floors["stem"] == 6 and floors["s1.b0.out"] == 8 and floors["s2.b0.mid"] == 8
    alpha = {g: a * 50 for g, a in random_alpha(spec).items()}  # peaked: the mass sits on ~1 channel per group
    drawn = draw(spec, alpha, 0.5, floors=floors)
    for g, idx in drawn.keep.items():
        assert idx.numel() >= floors[g], g
        assert idx.tolist() == sorted(set(idx.tolist()))
        dropped = torch.ones(alpha[g].numel(), dtype=torch.bool)
        dropped[idx] = False
        if dropped.any():
            assert alpha[g][idx].min() >= alpha[g][dropped].max(), g


def test_the_floor_is_ten_percent_and_the_divisor_and_reachability_uses_it():
    spec = models.full_spec("cifar_resnet:56", num_classes=10, shortcut="avgpool_conv")
    floors = Budget(flops_target=0.2).min_widths(spec)
    assert floors["stem"] == 2 and floors["s2.b0.out"] == 7 and floors["s1.b3.mid"] == 4  # ceil(0.1 * width)
    mobile = models.full_spec("mobilenet_v2:cifar", num_classes=10)
    assert all(
        w >= g.divisor
        for g in models.channel_groups(mobile)
        for w in [Budget(flops_target=0.2).min_widths(mobile)[g.name]]
    )
    floor_spec = models.with_widths(spec, floors)
    lowest = models.macs(floor_spec) / models.macs(spec)
    with pytest.raises(models.SpecError, match="impossible"):
        Budget(flops_target=lowest * 0.99).check_reachable(spec)
    Budget(flops_target=lowest * 1.01).check_reachable(spec)


def test_sharp_alpha_cannot_collapse_a_group_below_its_floor():
    spec = tiny_spec()
    alpha = {g: a * 1000 for g, a in random_alpha(spec, 4).items()}  # one channel carries all the mass
    drawn = draw(spec, alpha, 0.3)
    floors = Budget(flops_target=0.3).min_widths(spec)
    assert all(drawn.keep[g].numel() >= floors[g] for g in floors) and drawn.in_window


def test_gumbel_sampling_depends_only_on_the_generator():
    spec = tiny_spec()
    alpha = {g: torch.ones(a.numel()) for g, a in random_alpha(spec).items()}  # noise alone orders the channels

    def sample(seed: int) -> dict[str, list[int]]:
        torch.manual_seed(seed * 100 + 1)  # the global RNG must not matter
        keep = draw(spec, alpha, 0.5, gen=torch.Generator().manual_seed(seed), scale=1.0).keep
        return {g: k.tolist() for g, k in keep.items()}

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_hysteresis_keeps_the_incumbent_among_near_ties():
    alpha = {"g": torch.tensor([1.0, 0.95, 0.96, 0.2])}
    assert rank_channels(alpha, None, 0.0)["g"].order[:2].tolist() == [0, 2]
    incumbent = {"g": torch.tensor([0, 1])}
    assert rank_channels(alpha, None, 0.0, incumbent, 0.1)["g"].order[:2].tolist() == [0, 1]
    assert rank_channels(alpha, None, 0.0, incumbent, 0.005)["g"].order[:2].tolist() == [0, 2]


# -- ThreshNet -------------------------------------------------------------------------------------


def test_threshnet_reinforce_update_changes_the_policy():
    torch.manual_seed(0)
    policy = ThreshNet(n_actions=6)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    profiles, depths = policy_inputs(random_alpha(tiny_spec()))
    assert profiles.shape == (9, 64) and depths[0] == 0 and depths[-1] == 1
    actions = torch.tensor([0, 5, 1, 2, 3, 4, 0, 1, 2])
    baseline = MovingBaseline()

    def log_prob() -> float:
        with torch.no_grad():
            return float(torch.log_softmax(policy(profiles, depths), 1).gather(1, actions.view(-1, 1)).sum())

    before = [p.detach().clone() for p in policy.parameters()]
    # b_1 = r_1: the first advantage is exactly zero, so the first update is a no-op...
    assert baseline.update(-2.0) == 0.0
    reinforce_step(policy, opt, profiles, depths, actions, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    # ...the second one, with a reward above the baseline, makes the chosen actions more likely.
    lp0 = log_prob()
    advantage = baseline.update(-1.0)
    assert advantage == pytest.approx(-1.0 - (0.9 * -2.0 + 0.1 * -1.0))
    reinforce_step(policy, opt, profiles, depths, actions, advantage)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert log_prob() > lp0


def test_threshnet_greedy_action_moves_to_the_rewarded_threshold():
    torch.manual_seed(0)
    policy = ThreshNet(n_actions=6)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    profiles, depths = policy_inputs(random_alpha(tiny_spec()))
    gen = torch.Generator().manual_seed(0)
    baseline = MovingBaseline()

    def greedy() -> torch.Tensor:
        with torch.no_grad():
            return policy(profiles, depths).argmax(1)

    assert not (greedy() == 4).all()
    for _ in range(60):  # reward = share of groups that chose τ = actions[4]
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(policy(profiles, depths), 1), 1, generator=gen).view(-1)
        reward = float((actions == 4).float().mean())
        reinforce_step(policy, opt, profiles, depths, actions, baseline.update(reward))
    assert (greedy() == 4).all()


def test_policy_inputs_are_width_agnostic():
    uniform = {"a": torch.zeros(1), "b": torch.zeros(16), "c": torch.zeros(640)}
    profiles, _ = policy_inputs(uniform)
    assert torch.allclose(profiles, torch.ones(3, 64))


# -- α application ---------------------------------------------------------------------------------


def test_alpha_sites_post_bn_and_pre_bn():
    spec = tiny_spec()
    post = {s.module: s.group for s in alpha_sites(spec, "post_bn", 16)}
    pre = {s.module: s.group for s in alpha_sites(spec, "pre_bn", 16)}
    assert post["stem.bn"] == "stem" and pre["stem.conv"] == "stem"
    assert post["stages.0.1.bn2"] == "stem"  # identity-tied block output: same residual group
    assert post["stages.1.0.shortcut.conv"] == "s1.b0.out"  # avgpool_conv shortcut has no BN
    assert len(post) == len(pre) == 15  # stem + 6 blocks x 2 convs + 2 shortcut convs


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("position", ["post_bn", "pre_bn"])
def test_folded_alpha_matches_the_hooked_network(family, position):
    spec = tiny_spec(family)
    torch.manual_seed(0)
    net = models.build(spec).eval()
    alpha = {g: a * 2 - 0.5 for g, a in random_alpha(spec, 1).items()}
    x = torch.randn(2, 3, 16, 16)
    sites = alpha_sites(spec, position, 16)
    folded = models.build(spec).eval()
    folded.load_state_dict(fold_alpha(net.state_dict(), sites, alpha))
    with torch.no_grad():
        plain = net(x)
        attach_alpha(net, sites, alpha)
        hooked, from_folded = net(x), folded(x)
    scale = float(hooked.abs().max())
    assert (plain - hooked).abs().max() > 0.1 * scale  # α really enters the forward pass
    torch.testing.assert_close(from_folded, hooked, rtol=1e-4, atol=1e-5 * scale)


def test_map_back_round_trip():
    spec = tiny_spec()
    target = models.build(spec).state_dict()
    alpha = random_alpha(spec)
    before = {k: v.clone() for k, v in target.items()}
    keep = draw(spec, alpha, 0.5, gen=torch.Generator().manual_seed(1), scale=0.05).keep
    sub_spec, sub_state = extract_subnet(spec, target, keep)
    sub = models.build(sub_spec)
    sub.load_state_dict(sub_state)
    sub_alpha = {g: alpha[g][k].clone().requires_grad_(True) for g, k in keep.items()}
    attach_alpha(sub, alpha_sites(sub_spec, "post_bn", 16), sub_alpha)
    opt = torch.optim.SGD([*sub.parameters(), *sub_alpha.values()], lr=0.1)
    for _ in range(2):  # a couple of training steps change weights, BN statistics and α
        loss = torch.nn.functional.cross_entropy(sub(torch.randn(8, 3, 16, 16)), torch.arange(8) % 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = {k: v.detach().clone() for k, v in sub.state_dict().items()}
    map_back(spec, target, alpha, keep, trained, {g: a.detach() for g, a in sub_alpha.items()})
    _, again = extract_subnet(spec, target, keep)
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    for g, k in keep.items():
        assert torch.equal(alpha[g][k], sub_alpha[g].detach())
    dropped = torch.ones(16, dtype=torch.bool)
    dropped[keep["s1.b0.out"]] = False
    w = "stages.1.0.conv2.weight"
    assert torch.equal(target[w][dropped], before[w][dropped])  # channels not sampled are untouched


# -- convergence -------------------------------------------------------------------------------------


def test_group_similarity_tolerates_one_swap_only():
    a = torch.arange(10)
    assert group_similarity(a, torch.tensor([*range(9), 12])) == 1.0  # one channel swapped
    assert group_similarity(a, torch.arange(9)) == 1.0  # one channel dropped
    assert group_similarity(a, torch.tensor([*range(8), 12, 13])) == pytest.approx(8 / 12)
    assert group_similarity(a, torch.tensor([*range(8), 12, 13]), divisor=2) == 1.0


def test_convergence_is_macs_weighted_and_needs_patience_and_min_iterations():
    weights = {"big": 9.0, "small": 1.0}
    keep = {"big": torch.arange(20), "small": torch.arange(10)}
    moved_small = {"big": torch.arange(20), "small": torch.arange(5, 15)}  # the small group changed a lot
    moved_big = {"big": torch.arange(5, 25), "small": torch.arange(10)}
    tracker = ConvergenceTracker(weights, {}, 0.9, patience=3, min_iterations=5)
    sims = [tracker.update(k) for k in [keep, moved_small, moved_small, moved_small]]
    assert sims[0] == 0.0 and sims[1] == pytest.approx(0.9 + 0.1 * 5 / 15) and not tracker.converged
    assert tracker.update(moved_small) == 1.0 and tracker.converged  # 4 stable, 5 seen
    tracker = ConvergenceTracker(weights, {}, 0.9, patience=3, min_iterations=1)
    for k in [keep, keep, moved_big, moved_big, moved_big]:
        tracker.update(k)
    assert tracker.streak == 2 and not tracker.converged  # 0.9 * 15/25 + 0.1 < 0.9 broke the streak


def test_the_deterministic_subnet_converges_once_alpha_is_sharp(tmp_path):
    """A constructed sharp α and a fixed τ: the deterministic subnet no longer moves, so the rule fires
    after patience iterations once min_iterations have passed, with the Gumbel noise still on."""
    ctx = make_ctx(tmp_path)
    method = AST(ctx, {"threshnet": False, "min_iterations": 4, "convergence_patience": 2})
    method.alpha = {g: torch.linspace(3, 0, a.numel()) for g, a in method.alpha.items()}
    keeps = [method.deterministic_subnet().keep for _ in range(5)]
    for keep in keeps:
        method.convergence.update(keep)
    assert all(
        {g: k.tolist() for g, k in keep.items()} == {g: k.tolist() for g, k in keeps[0].items()} for keep in keeps
    )
    assert method.convergence.converged


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A full AST search on the tiny net at a 30% target, down to the deterministic final step."""
    ctx = make_ctx(tmp_path_factory.mktemp("ast"), budget=0.3)
    method = AST(
        ctx,
        {
            **AST.smoke,
            "max_iterations": 6,
            "min_iterations": 2,
            "alpha_passes": 3,
            "alpha_lr": 0.2,
            "noise_iterations": 3,
        },
    )
    policy_before = [p.detach().clone() for p in method.policy.parameters()]
    entropy_before = mean_alpha_entropy(method.alpha)
    results = method.run()
    return ctx, method, results, policy_before, entropy_before


@pytest.mark.slow  # a full AST search (the module's short_run)
def test_every_reported_subnet_is_in_the_target_window(short_run):
    ctx, method, results, _, _ = short_run
    records = [rec for r in results for rec in r.subnets]
    full, target = models.macs(ctx.spec, 16), ctx.budget.target_macs(ctx.spec, 16)
    assert method.done and records[-1].source["deterministic"] and results[-1].done
    assert [rec.step for rec in records] == list(range(len(records)))
    for rec in records:
        assert 0.9 * target <= rec.macs <= target and rec.source["in_window"]
        assert within_budget(rec.spec, ctx.spec, ctx.budget, 16)
    floors = ctx.budget.min_widths(ctx.spec)
    widths = {g.name: g.width for g in models.channel_groups(records[-1].spec)}
    assert all(widths[g] >= floors[g] for g in floors)
    assert full > target


@pytest.mark.slow  # a full AST search (the module's short_run)
def test_alpha_sharpens_and_the_policy_learns(short_run):
    _, method, results, before, entropy_before = short_run
    assert mean_alpha_entropy(method.alpha) < entropy_before
    assert any(not torch.equal(a, b) for a, b in zip(before, method.policy.parameters(), strict=True))
    assert all(r.metrics["gumbel_scale"] == 0.0 for r in results[3:-1])  # noise annealed to 0


@pytest.mark.slow  # a full AST search (the module's short_run)
def test_the_result_is_the_trained_deterministic_subnet(short_run):
    _ctx, method, _results, _, _ = short_run
    best = method.best()
    assert best is method.final.record and best.source["deterministic"] and "val_top1" in best.metrics
    net = models.build(best.spec)
    net.load_state_dict(method.initial_weights(best))  # α folded in: a plain network
    score = evaluate(net, method.search_val)
    assert score["loss"] == pytest.approx(best.metrics["val_loss"], rel=1e-4)


@pytest.mark.slow  # a full method run
def test_random_search_arm_samples_fresh_subnets_and_picks_by_search_val(tmp_path):
    ctx = make_ctx(tmp_path)
    arm = {**AST.smoke, "freeze_alpha": True, "threshnet": False, "stop_on_convergence": False, "max_iterations": 3}
    method = AST(ctx, arm)
    records = [rec for r in method.run() for rec in r.subnets]
    assert len(records) == 3 and method.done and method.final is None
    assert all(torch.equal(a, torch.ones_like(a)) for a in method.alpha.values())  # α never trained
    assert len({rec.key for rec in records} | {str(rec.source["width_scale"]) for rec in records}) > 1
    assert method.best().metrics["val_top1"] == max(rec.metrics["val_top1"] for rec in records)


@pytest.mark.slow  # an AST iteration on VGG and MobileNetV2
@pytest.mark.parametrize("family", ["vgg", "mobilenet_v2"])
def test_one_iteration_on_other_families(family, tmp_path):
    ctx = make_ctx(tmp_path, spec=tiny_spec(family), budget=0.6)
    method = AST(ctx, {**AST.smoke, "max_iterations": 1})
    (record,) = method.step().subnets
    assert within_budget(record.spec, ctx.spec, ctx.budget, 16) and 0 <= record.metrics["val_top1"] <= 1
    for g in models.channel_groups(record.spec):  # mobilenet widths stay multiples of 8
        assert (
            g.width % g.divisor == 0
            or g.width == dict((h.name, h.width) for h in models.channel_groups(ctx.spec))[g.name]
        )


# -- hyperparameters ---------------------------------------------------------------------------------


def test_hparams_reject_bad_values_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="residual_mode='coupled'"):
        ASTHparams(residual_mode="independent")
    with pytest.raises(ValueError, match="lr_schedule"):
        ASTHparams(lr_schedule=[(5, 0.1)])
    with pytest.raises(ValueError, match="epochs_schedule needs whole"):
        ASTHparams(epochs_schedule=[(0, 1.5)])
    with pytest.raises(ValueError, match="needs a teacher"):
        AST(make_ctx(tmp_path), {"search_kd_weight": 0.5})


def test_paper_preset_matches_the_reference_schedule():
    """The reference's (M, lr) = (40, 0.05) if t <= 20 else (30, 0.01) if t <= 50 else (10, 0.005), with
    1-based t: the first 20 iterations (0-based 0..19) get 40 epochs at 0.05."""
    hp = ASTHparams(preset="paper")
    assert [(hp.epochs_at(t), hp.lr_at(t)) for t in (0, 19, 20, 49, 50)] == [
        (40, 0.05),
        (40, 0.05),
        (30, 0.01),
        (30, 0.01),
        (10, 0.005),
    ]
    assert sum(hp.epochs_at(t) for t in range(hp.max_iterations)) == 20 * 40 + 30 * 30
    assert ASTHparams(preset="paper", max_iterations=7).max_iterations == 7  # explicit fields win
    assert ASTHparams().epochs_schedule == PRESETS["fast"]["epochs_schedule"]
    assert hp.alpha_lr_at(20) == pytest.approx(hp.alpha_lr / 5)


def test_alpha_passes_are_spread_over_the_epochs():
    assert alpha_pass_counts(40, 5) == [1 if e % 8 == 7 else 0 for e in range(40)]
    assert alpha_pass_counts(2, 5) == [2, 3] and sum(alpha_pass_counts(7, 5)) == 5


@pytest.mark.parametrize("method", ["ast", "l1", "fpgm"])
def test_weight_inheriting_methods_refuse_option_a_before_any_work(method, tmp_path):
    spec = models.full_spec("cifar_resnet:tiny", num_classes=4)  # option_a by default
    assert get_method(method).inherits_weights
    with pytest.raises(models.SpecError, match="use the shortcut avgpool_conv or conv_bn"):
        get_method(method).check_spec(spec)
    with pytest.raises(models.SpecError, match="option_a"):
        get_method(method)(make_ctx(tmp_path, spec=spec))
    assert models.macs(spec, 32) > 0  # counting MACs keeps option_a


def test_warm_start_from_a_checkpoint(tmp_path):
    spec = tiny_spec()
    torch.manual_seed(3)
    state = models.build(spec).state_dict()
    torch.save(state, tmp_path / "w.pt")
    method = AST(make_ctx(tmp_path), {"warm_start": str(tmp_path / "w.pt")})
    assert all(torch.equal(method.target[k], v) for k, v in state.items())
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, tmp_path / "bad.pt")
    with pytest.raises(models.SpecError, match="does not match the full spec"):
        AST(make_ctx(tmp_path), {"warm_start": str(tmp_path / "bad.pt")})


@pytest.mark.slow  # two AST iterations
def test_a_diverged_subnet_leaves_the_threshold_policy_finite(tmp_path):
    """A subnet whose training diverges (val loss NaN, as on torchvision:mnasnet0_5 at 8x8) is
    recorded, but the policy is not updated from it: a NaN advantage made every ThreshNet weight
    NaN and the next draw failed inside torch.multinomial."""
    method = AST(make_ctx(tmp_path), {**AST.smoke, "max_iterations": 2, "stop_on_convergence": False})
    train_and_score = method._train_and_score

    def diverged(*args, **kwargs):
        trained, val, train_loss = train_and_score(*args, **kwargs)
        return trained, {**val, "loss": math.nan}, train_loss

    method._train_and_score = diverged
    first, second = method.step(), method.step()
    assert math.isnan(first.metrics["reward"]) and math.isnan(second.metrics["baseline"])
    assert all(bool(torch.isfinite(p).all()) for p in method.policy.parameters())
