"""Engine training: KD loss, optimizer/schedule, evaluate, exact resume, seeding, convergence."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from rayprune import models
from rayprune.engine import checkpoint as ckpt
from rayprune.engine.data import Dataset, load_dataset, make_loader, synthetic_dataset
from rayprune.engine.train import (
    TrainConfig,
    evaluate,
    fit,
    kd_loss,
    make_optimizer,
    make_scheduler,
    recalibrate_bn,
    recalibration_batches,
)
from rayprune.engine.utils import resolve_device

# -- KD -----------------------------------------------------------------------------------------


def test_kd_with_identical_logits_is_the_ce_share_only():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = kd_loss(logits, logits.clone(), y, weight=0.9, temperature=4.0)
    assert loss.item() == pytest.approx(0.1 * F.cross_entropy(logits, y).item(), rel=1e-6)


def test_kd_term_matches_a_hand_computation():
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 0.0]]), torch.tensor([0])
    # T=2: teacher probs softmax([2, 0]) = (p, 1-p); student softmax([0, 0]) = (1/2, 1/2).
    p = math.exp(2) / (math.exp(2) + 1)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    expected = 0.5 * math.log(2) + 0.5 * 4 * kl
    assert kd_loss(s, t, y, weight=0.5, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


# -- optimizer and schedule -------------------------------------------------------------------


def test_no_weight_decay_on_bn_and_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = make_optimizer(net, TrainConfig(weight_decay=1e-3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4} and len(no_decay["params"]) == 4  # bn w/b, 2 biases
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    flat = make_optimizer(net, TrainConfig(no_decay_bn_bias=False))
    assert len(flat.param_groups) == 1


def lrs(cfg, steps_per_epoch):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_per_iteration():
    got = lrs(TrainConfig(epochs=3, lr=0.4, warmup_epochs=1), steps_per_epoch=2)
    # warm-up steps 0,1: 0.4*1/2, 0.4*2/2; cosine over the remaining 4 steps: 0.2*(1+cos(pi*k/4)).
    expected = [0.2, 0.4] + [0.2 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert got == pytest.approx(expected)


def test_step_schedule_decays_at_milestones():
    got = lrs(TrainConfig(epochs=4, lr=1.0, schedule="step", milestones=[1, 3], gamma=0.5), steps_per_epoch=2)
    assert got == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_config_rejects_unknown_and_inconsistent_fields():
    with pytest.raises(ValidationError, match="lr_max"):
        TrainConfig(lr_max=0.1)
    with pytest.raises(ValidationError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(ValidationError, match="schedule"):
        TrainConfig(schedule="linear")


# -- evaluate -----------------------------------------------------------------------------------


class PixelLogits(nn.Module):
    """Logits = the first pixel row of channel 0, so a dataset can spell out its own logits."""

    def forward(self, x):
        return x[:, 0, 0, :6].float()


def test_evaluate_top1_top5_and_loss_by_hand():
    logits = torch.tensor([[9, 1, 2, 3, 4, 5], [1, 9, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5], [2, 1, 3, 4, 5, 9]])
    y = torch.tensor([0, 0, 1, 0])  # ranks of the true class: 1, 6, 6, 5
    x = torch.zeros(4, 3, 6, 6, dtype=torch.uint8)
    x[:, 0, 0, :] = logits.to(torch.uint8)
    ds = Dataset(x, y, 6, (0.0,) * 3, (1 / 255,) * 3, "by-hand")  # normalisation undoes /255
    got = evaluate(PixelLogits(), ds, batch_size=3)
    assert got["top1"] == 0.25 and got["top5"] == 0.5
    assert got["loss"] == pytest.approx(F.cross_entropy(logits.float(), y).item(), rel=1e-5)


# -- fit: seeding, resume -------------------------------------------------------------------------


def tiny_setup(seed=0):
    train, val = synthetic_dataset(n_train=64, n_test=16, num_classes=4, size=16, seed=0)
    torch.manual_seed(seed)
    net = models.build(models.full_spec("cifar_resnet:tiny", num_classes=4))
    return net, train, val


CFG = TrainConfig(epochs=3, batch_size=32, lr=0.05, warmup_epochs=1)


def test_fit_is_seeded_and_leaves_the_global_rng_alone():
    net_a, train, _ = tiny_setup()
    net_b, _, _ = tiny_setup()
    before = torch.get_rng_state()
    hist_a = fit(net_a, train, CFG.model_copy(update={"epochs": 1}), seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    hist_b = fit(net_b, train, CFG.model_copy(update={"epochs": 1}), seed=5, progress=False)
    assert hist_a == hist_b and set(hist_a[0]) == {"epoch", "loss", "lr"}
    net_c, _, _ = tiny_setup()
    assert fit(net_c, train, CFG.model_copy(update={"epochs": 1}), seed=6, progress=False) != hist_a


def test_resume_after_an_interruption_continues_bitwise(tmp_path):
    net, train, val = tiny_setup()
    full = fit(net, train, CFG, val=val, progress=False, seed=1)
    assert len(full) == 3 and all(math.isfinite(h["loss"]) for h in full)

    first, _, _ = tiny_setup()
    stopped = fit(
        first,
        train,
        CFG,
        val=val,
        progress=False,
        seed=1,
        checkpoint_dir=tmp_path,
        on_epoch=lambda entry: entry["epoch"] == 1,
    )  # "killed" after epoch 1
    assert stopped == full[:2]
    fresh, _, _ = tiny_setup(seed=99)  # different init: everything must come from the checkpoint
    random.random(), np.random.rand(), torch.rand(1)  # the caller's streams move on after the checkpoint
    caller_rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    resumed = fit(fresh, train, CFG, val=val, progress=False, seed=1, checkpoint_dir=tmp_path)
    assert random.getstate() == caller_rng[0] and (np.random.get_state()[1] == caller_rng[1]).all()
    assert torch.equal(torch.get_rng_state(), caller_rng[2])  # resuming leaves the caller's RNGs alone
    assert resumed == full  # includes epoch 2's loss, lr and val_top1, compared exactly
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary files left behind
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 3


def test_resume_refuses_a_checkpoint_from_another_recipe(tmp_path):
    net, train, _ = tiny_setup()
    fit(net, train, CFG.model_copy(update={"epochs": 1}), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different TrainConfig"):
        fit(net, train, CFG.model_copy(update={"epochs": 1, "lr": 0.2}), progress=False, checkpoint_dir=tmp_path)


def test_custom_loss_kd_teacher_and_missing_teacher():
    net, train, _ = tiny_setup()
    calls = []

    def loss_fn(model, x, y):
        calls.append(x.shape[0])
        return F.cross_entropy(model(x), y)

    fit(net, train, CFG.model_copy(update={"epochs": 1}), loss_fn=loss_fn, progress=False)
    assert calls == [32, 32]
    teacher, _, _ = tiny_setup(seed=3)
    teacher.train()
    kd = CFG.model_copy(update={"epochs": 1, "kd_weight": 0.9})
    hist = fit(net, train, kd, teacher=teacher, progress=False)
    assert math.isfinite(hist[0]["loss"]) and not teacher.training  # the teacher runs in eval mode
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(net, train, kd, progress=False)


def test_bn_recalibration_draws_a_seeded_subset_across_classes():
    train, _ = synthetic_dataset(n_train=64, n_test=8, num_classes=4, size=8, seed=0)
    by_class = train.subset(torch.argsort(train.labels, stable=True))  # as an image folder: class-sorted
    rows = next(iter(make_loader(by_class, 64, train=False)))[0].flatten(1)

    def drawn(seed: int) -> list[int]:
        batches = list(recalibration_batches(by_class, 20, 8, device="cpu", seed=seed))
        assert [len(x) for x in batches] == [8, 8, 4]
        return [int((rows == x).all(1).nonzero()) for x in torch.cat(batches).flatten(1)]

    picked = drawn(3)
    assert len(set(picked)) == 20 and picked == drawn(3) and picked != drawn(4)
    assert len(set(by_class.labels[picked].tolist())) > 1  # the first 20 rows would be one class

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    recalibrate_bn(net, recalibration_batches(by_class, 16, 8, device="cpu", seed=3))
    conv_out = net[0](torch.cat(list(recalibration_batches(by_class, 16, 8, device="cpu", seed=3))))
    assert not net.training  # left in eval mode, with the mean of the drawn images (equal batches)
    torch.testing.assert_close(net[1].running_mean, conv_out.mean((0, 2, 3)).detach(), rtol=1e-5, atol=1e-6)


def test_resolve_device():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")


# -- convergence --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_resnet_learns_digits():
    train, test = load_dataset("digits")
    torch.manual_seed(0)
    net = models.build(models.full_spec("cifar_resnet:tiny", num_classes=10))
    # 15 short epochs (330 steps, a few seconds); seeds 0-2 reach 0.964-0.975 on the held-out 20%.
    fit(net, train, TrainConfig(epochs=15, batch_size=64, lr=0.1, warmup_epochs=1), progress=False)
    assert evaluate(net, test)["top1"] >= 0.90


def test_derive_seed_mixes_ints_and_names_stably():
    from rayprune.engine.utils import derive_seed

    assert derive_seed(0, "pretrain") == derive_seed(0, "pretrain") != derive_seed(1, "pretrain")
    assert len({derive_seed(0, 1), derive_seed(1, 0), derive_seed(0, "1"), derive_seed(1)}) == 4
    assert 0 <= derive_seed(-5, 2**70) < 2**63


def test_progress_bar_goes_to_stderr(capsys):
    net, train, _ = tiny_setup()
    fit(net, train, CFG.model_copy(update={"epochs": 1}), progress=True)
    assert "fit" in capsys.readouterr().err


def test_bn_layers_lists_every_batch_norm_in_module_order():
    from rayprune.engine import bn_layers

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyBatchNorm1d(),
        torch.nn.Linear(4, 2),
        torch.nn.BatchNorm1d(2),
    )
    assert bn_layers(net) == [net[1], net[3], net[5]]
    assert not bn_layers(torch.nn.Linear(2, 2))
