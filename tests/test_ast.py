"""AST / ThreshNet: selection numbers, sampling, ThreshNet's learning signal, α hooks and folding,
map-back, convergence and the FLOPs-target constraint."""

from __future__ import annotations

import pytest
import torch

from rayprune import models
from rayprune.engine.data import synthetic_dataset
from rayprune.engine.train import TrainConfig, evaluate
from rayprune.methods import Budget, RunContext, within_budget
from rayprune.methods.ast import (AST, ASTHparams, ConvergenceTracker, MovingBaseline, ThreshNet, alpha_sites,
                                  attach_alpha, fold_alpha, map_back, mass_threshold_keep, policy_inputs,
                                  reinforce_step, sample_keep, shrink_to_budget)
from rayprune.models.transfer import extract_subnet, full_keep, subnet_spec

TINY = {"cifar_resnet": ("cifar_resnet:tiny", {"shortcut": "avgpool_conv"}), "vgg": ("vgg:tiny", {}),
        "mobilenet_v2": ("mobilenet_v2:tiny", {})}


def tiny_spec(family: str = "cifar_resnet") -> dict:
    model, options = TINY[family]
    return models.full_spec(model, num_classes=4, **options)


def random_alpha(spec: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.width, generator=gen) for g in models.channel_groups(spec)}


def make_ctx(tmp_path, spec=None, budget=0.5, max_stage_prune=None) -> RunContext:
    spec = spec or tiny_spec()
    train, test = synthetic_dataset(n_train=160, n_test=64, num_classes=4, size=16, seed=0)
    return RunContext(spec=spec, train=train, test=test,
                      budget=Budget(flops_target=budget, max_stage_prune=max_stage_prune), device="cpu", seed=5,
                      workdir=tmp_path, finetune=TrainConfig(epochs=1, batch_size=32), input_size=16, progress=False)


# -- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tau, kept", [(0.6, 10), (0.85, 14), (0.75, 12), (1.0, 16)])
def test_mass_threshold_reference_numbers(tau, kept):
    # methods.md §5 item 11: uniform α, no noise, 16 filters -> ceil(tau * 16) filters.
    uniform = torch.full((16,), 1 / 16)
    assert mass_threshold_keep(uniform, tau).numel() == kept
    keep = sample_keep({"g": torch.zeros(16)}, {"g": tau}, torch.Generator(), 0.0, {"g": 1})
    assert keep["g"].tolist() == list(range(kept))  # ties keep the lowest indices, ascending


def test_mass_threshold_keeps_the_heaviest_channels_in_ascending_order():
    probs = torch.tensor([0.1, 0.05, 0.3, 0.05, 0.5])
    assert mass_threshold_keep(probs, 0.8).tolist() == [2, 4]  # 0.5 + 0.3 reaches 0.8 exactly
    assert mass_threshold_keep(probs, 0.81).tolist() == [0, 2, 4]
    assert mass_threshold_keep(probs, 0.5, min_keep=4).tolist() == [0, 1, 2, 4]
    assert mass_threshold_keep(probs, 0.5, divisor=2).tolist() == [2, 4]


def test_kept_sets_are_sorted_and_respect_min_widths():
    spec = tiny_spec()
    budget = Budget(flops_target=0.5, max_stage_prune=[0.25, 0.5, 0.75])
    mins = budget.min_widths(spec)
    alpha = {g: a * 50 for g, a in random_alpha(spec).items()}  # peaked: alone, ~1 channel reaches the mass
    keep = sample_keep(alpha, {g: 0.6 for g in alpha}, torch.Generator().manual_seed(0), 0.05, mins)
    widths = {g.name: g.width for g in models.channel_groups(spec)}
    for g, idx in keep.items():
        assert idx.numel() == mins[g], g  # the minimum width binds for every group here
        assert idx.tolist() == sorted(set(idx.tolist()))
        assert 0 <= idx.min() and idx.max() < widths[g]
    assert mins["stem"] == 6 and mins["s1.b0.out"] == 8 and mins["s2.b0.mid"] == 8


def test_gumbel_sampling_depends_only_on_the_generator():
    spec = tiny_spec()
    alpha, taus, mins = random_alpha(spec), {g.name: 0.7 for g in models.channel_groups(spec)}, {
        g.name: 1 for g in models.channel_groups(spec)}

    def draw(seed: int) -> dict[str, list[int]]:
        torch.manual_seed(seed * 100 + 1)  # the global RNG must not matter
        keep = sample_keep(alpha, taus, torch.Generator().manual_seed(seed), 1.0, mins)
        return {g: k.tolist() for g, k in keep.items()}

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


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
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    # ...the second one, with a reward above the baseline, makes the chosen actions more likely.
    lp0 = log_prob()
    advantage = baseline.update(-1.0)
    assert advantage == pytest.approx(-1.0 - (0.9 * -2.0 + 0.1 * -1.0))
    reinforce_step(policy, opt, profiles, depths, actions, advantage)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert log_prob() > lp0


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
    keep = sample_keep(alpha, {g: 0.6 for g in alpha}, torch.Generator().manual_seed(1), 0.05,
                       {g: 1 for g in alpha})
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


def _keep(*idx: int) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(idx), "b": torch.arange(4)}


def test_convergence_after_three_stable_iterations():
    tracker = ConvergenceTracker(0.9, 0.01, 3)
    assert [tracker.update(_keep(*range(10)), 1000) for _ in range(4)] == [False, False, False, True]
    # Jaccard 9/10 = 0.9 still counts as stable; a MACs change below 1% too.
    tracker = ConvergenceTracker(0.9, 0.01, 3)
    seq = [(_keep(*range(10)), 1000), (_keep(*range(9)), 1009), (_keep(*range(9)), 1009), (_keep(*range(9)), 1000)]
    assert [tracker.update(k, m) for k, m in seq] == [False, False, False, True]


def test_no_convergence_when_macs_move_or_sets_change():
    tracker = ConvergenceTracker(0.9, 0.01, 3)
    macs = [1000, 1010, 1020.1, 1030.301, 1040.60401]  # exactly +1% per iteration: not < 1%
    assert not any(tracker.update(_keep(*range(10)), round(m)) for m in macs)
    tracker = ConvergenceTracker(0.9, 0.01, 3)
    sets = [range(10), range(10), range(10), [*range(9), 10], [*range(9), 10], [*range(9), 10]]  # Jaccard 9/11
    assert [tracker.update(_keep(*s), 1000) for s in sets] == [False, False, False, False, False, False]
    assert tracker.streak == 2


def test_min_jaccard_to_previous_is_the_worst_group():
    tracker = ConvergenceTracker(0.9, 0.01, 3)
    assert tracker.min_jaccard_to_previous({"a": torch.arange(4)}) == 0.0  # nothing to compare with yet
    tracker.update({"a": torch.arange(4), "b": torch.arange(10)}, 1000)
    assert tracker.min_jaccard_to_previous({"a": torch.arange(4), "b": torch.arange(9)}) == 0.9
    assert tracker.min_jaccard_to_previous({"a": torch.tensor([0, 1, 2, 5]), "b": torch.arange(10)}) == 3 / 5


# -- FLOPs target --------------------------------------------------------------------------------------


def test_shrink_to_budget_drops_the_lowest_alpha_channels():
    spec = tiny_spec()
    alpha = random_alpha(spec, 2)
    full = models.macs(spec, 16)
    mins = Budget(flops_target=0.3, max_stage_prune=[0.5, 0.5, 0.5]).min_widths(spec)
    keep = shrink_to_budget(spec, full_keep(spec), alpha, int(0.3 * full), mins, 16)
    assert models.macs(subnet_spec(spec, keep), 16) <= 0.3 * full
    for g, idx in keep.items():
        assert idx.numel() >= mins[g]
        dropped = torch.ones(alpha[g].numel(), dtype=torch.bool)
        dropped[idx] = False
        if dropped.any():
            assert alpha[g][idx].min() >= alpha[g][dropped].max(), g


@pytest.fixture(scope="module")
def tight_run(tmp_path_factory):
    """Three AST iterations under a 15% FLOPs target (forces re-draws and shrinking)."""
    ctx = make_ctx(tmp_path_factory.mktemp("ast"), budget=0.15)
    method = AST(ctx, AST.smoke)
    policy_before = [p.detach().clone() for p in method.policy.parameters()]
    results = method.run()
    return ctx, method, results, policy_before


def test_every_reported_subnet_is_within_the_flops_target(tight_run):
    ctx, method, results, _ = tight_run
    records = [rec for r in results for rec in r.subnets]
    assert [rec.source["iteration"] for rec in records] == [0, 1, 2] and method.done
    assert all(within_budget(rec.spec, ctx.spec, ctx.budget, 16) for rec in records)
    assert any(rec.source["shrunk"] for rec in records)
    assert all(r.metrics["redraws"] == 3 for r in results if r.metrics["shrunk"])


def test_policy_learns_during_the_search(tight_run):
    _, method, _, before = tight_run
    assert any(not torch.equal(a, b) for a, b in zip(before, method.policy.parameters()))


def test_inherited_weights_reproduce_the_search_val_score(tight_run):
    ctx, method, _, _ = tight_run
    best = method.best()
    assert best.metrics["val_top1"] == max(rec.metrics["val_top1"] for rec, _ in method.top)
    net = models.build(best.spec)
    net.load_state_dict(method.initial_weights(best))  # α folded in: a plain network
    score = evaluate(net, method.search_val)
    assert score["loss"] == pytest.approx(best.metrics["val_loss"], rel=1e-4)


@pytest.mark.parametrize("family", ["vgg", "mobilenet_v2"])
def test_one_iteration_on_other_families(family, tmp_path):
    ctx = make_ctx(tmp_path, spec=tiny_spec(family), budget=0.6)
    method = AST(ctx, {**AST.smoke, "max_iterations": 1})
    (record,) = method.step().subnets
    assert within_budget(record.spec, ctx.spec, ctx.budget, 16) and 0 <= record.metrics["val_top1"] <= 1
    for g in models.channel_groups(record.spec):  # mobilenet widths stay multiples of 8
        assert g.width % g.divisor == 0 or g.width == dict(
            (h.name, h.width) for h in models.channel_groups(ctx.spec))[g.name]


# -- hyperparameters ---------------------------------------------------------------------------------


def test_hparams_reject_bad_values_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="residual_mode='coupled'"):
        ASTHparams(residual_mode="independent")
    with pytest.raises(ValueError, match="lr_schedule"):
        ASTHparams(lr_schedule=[(5, 0.1)])
    with pytest.raises(ValueError, match="needs a teacher"):
        AST(make_ctx(tmp_path), {"search_kd_weight": 0.5})
    assert ASTHparams().lr_at(0) == 0.05 and ASTHparams().lr_at(21) == 0.01 and ASTHparams().lr_at(60) == 0.005


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
