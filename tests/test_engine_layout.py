"""Image layout on the CPU: plain NCHW, because oneDNN's NHWC backward of a strided 1x1 conv
with few input channels writes out of bounds (see rayprune.engine.utils.image_layout)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rayprune.engine.data import make_loader, synthetic_dataset
from rayprune.engine.utils import as_image_batch, image_layout

# Run in a child: on the faulty path the process dies (one thread) or hangs (two).
TRAIN_A_STRIDED_1X1_CONV = textwrap.dedent(
    """
    import torch
    from torch import nn
    from rayprune.engine.data import synthetic_dataset
    from rayprune.engine.train import TrainConfig, fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 1, stride=2, bias=False),  # strided 1x1, 4 input channels (< 8 and < 16)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).to(memory_format=torch.channels_last)  # as latency timing leaves a net
    # two steps: with NHWC batches (the bug) this dies (SIGSEGV or SIGABRT) 3 times out of 3
    train, _ = synthetic_dataset(n_train=64, n_test=4, num_classes=4, size=32, seed=0)
    history = fit(net, train, TrainConfig(epochs=1, batch_size=32, lr=0.05, warmup_epochs=0), progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert net[2].weight.is_contiguous()
    print("trained", len(history))
    """
)


def test_cpu_batches_and_weights_are_plain_nchw():
    cpu = torch.device("cpu")
    assert image_layout(cpu) == torch.contiguous_format
    assert image_layout(torch.device("cuda")) == torch.channels_last
    nhwc = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert as_image_batch(nhwc).is_contiguous()
    train, _ = synthetic_dataset(n_train=8, n_test=4, num_classes=2, size=8, seed=0)
    x, _ = next(iter(make_loader(train, 4, train=True, seed=0, device=cpu)))
    assert x.shape == (4, 3, 8, 8) and x.is_contiguous()


@pytest.mark.slow
def test_training_a_strided_1x1_conv_on_few_channels_neither_crashes_nor_hangs():
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_A_STRIDED_1X1_CONV], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "trained 1"
