"""Engine robust suite, latency and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayprune.engine import checkpoint as ckpt
from rayprune.engine.data import Dataset, synthetic_dataset
from rayprune.engine.latency import measure_latency
from rayprune.engine.robust import CORRUPTIONS, ROBUST_SUITE_VERSION, corrupt, robust_accuracy


def images(seed=0, n=4, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_images_stays_in_range_and_is_seeded(name):
    x = images()
    a = corrupt(x, name, torch.Generator().manual_seed(1))
    b = corrupt(x, name, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert (a - x).abs().mean() > 0.01  # really changes the input
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_no_corruption_is_a_no_op_on_tiny_inputs(name, size):
    # Version 1 blurred 8x8 digits with a 0.175 px sigma: robust/gaussian_blur == test_top1 in every record.
    x = images(size=size)
    a = corrupt(x, name, torch.Generator().manual_seed(1))
    assert (a - x).abs().mean() > 0.01, (name, size)


def test_no_corruption_is_a_no_op_on_the_8x8_digits():
    from rayprune.engine.data import load_dataset

    _, test = load_dataset("digits")
    x01 = test.x[:256].float() / 255
    assert x01.shape[-1] == 8
    for i, name in enumerate(CORRUPTIONS):
        changed = (corrupt(x01, name, torch.Generator().manual_seed(i)) - x01).abs().mean().item()
        assert changed > 0.01, name
    assert ROBUST_SUITE_VERSION == 2  # bump it whenever the suite changes: stored records name it


def test_corruptions_by_hand():
    x = images()
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(corrupt(x, "brightness", gen), (x + 0.15).clamp(0, 1))
    low = corrupt(x, "contrast", gen)
    assert torch.allclose(low.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)  # mean kept
    assert torch.allclose(low.std(dim=(1, 2, 3)), 0.4 * x.std(dim=(1, 2, 3)), rtol=1e-4)
    flat = torch.full((1, 3, 16, 16), 0.3)
    for name in ("gaussian_blur", "pixelate", "contrast"):
        assert torch.allclose(corrupt(flat, name, gen), flat, atol=1e-6), name  # nothing to blur/pixelate
    noisy = corrupt(torch.full((1, 3, 64, 64), 0.5), "gaussian_noise", gen)
    assert (noisy - 0.5).std().item() == pytest.approx(0.08, rel=0.05)
    noise_a = corrupt(x, "gaussian_noise", torch.Generator().manual_seed(1))
    assert not torch.equal(noise_a, corrupt(x, "gaussian_noise", torch.Generator().manual_seed(2)))


class MeanBrightness(nn.Module):
    """Predicts class 1 when the (normalised) image is bright on average, else class 0."""

    def forward(self, x):
        score = x.mean(dim=(1, 2, 3))
        return torch.stack([-score, score], dim=1)


def test_robust_accuracy_is_the_mean_over_the_suite_and_deterministic():
    x = torch.cat([torch.full((6, 3, 8, 8), 40), torch.full((6, 3, 8, 8), 215)]).to(torch.uint8)
    y = torch.tensor([0] * 6 + [1] * 6)
    ds = Dataset(x, y, 2, (0.5,) * 3, (0.25,) * 3, "dark-bright")
    model = MeanBrightness().train()
    out = robust_accuracy(model, ds, seed=3, batch_size=5)
    assert model.training  # mode restored
    assert set(out) == {"robust_top1", *(f"robust/{n}" for n in CORRUPTIONS)}
    per = [out[f"robust/{n}"] for n in CORRUPTIONS]
    assert out["robust_top1"] == pytest.approx(sum(per) / len(per))
    # Dark images (0.16) turn bright (> 0.5) under no corruption of the suite: all 12 stay correct.
    assert out["robust_top1"] == 1.0
    assert robust_accuracy(model, ds, seed=3, batch_size=5) == out


def test_robust_accuracy_subsample_is_seeded():
    _, test = synthetic_dataset(n_train=4, n_test=40, num_classes=4, size=8, seed=0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.manual_seed(0)
    a = robust_accuracy(net, test, seed=1, max_samples=16)
    assert a == robust_accuracy(net, test, seed=1, max_samples=16)
    assert all(v * 16 == round(v * 16) for v in a.values() if v != a["robust_top1"])  # 16 samples


def test_latency_keys_and_order():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    out = measure_latency(net, (3, 8, 8), batch_sizes=(1, 4), warmup=1, repeats=5)
    assert set(out) == {"latency_ms_b1_p50", "latency_ms_b1_p90", "latency_ms_b4_p50", "latency_ms_b4_p90"}
    assert 0 < out["latency_ms_b1_p50"] <= out["latency_ms_b1_p90"] and net.training


# -- checkpoints ----------------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_atomic_save_round_trip_and_no_partial_file_on_failure(tmp_path):
    path = tmp_path / "c" / "last.pt"
    ckpt.atomic_save({"w": torch.arange(3), "meta": {"epoch": 2}}, path)
    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_save({"w": Unpicklable()}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    got = ckpt.load(path)
    assert torch.equal(got["w"], torch.arange(3)) and got["meta"] == {"epoch": 2}


def test_rng_capture_restore_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    ckpt.atomic_save(ckpt.capture_rng(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.restore_rng(ckpt.load(tmp_path / "rng.pt"))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
