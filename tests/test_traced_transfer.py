"""Weight transfer on traced families: extract a subnet (through concatenations, depthwise
convs, squeeze-excitation products), build it, load it strictly, write it back, and zero the
dropped channels of the full net so that it computes what the subnet computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rayprune import models
from rayprune.models.tiles import per_block_prefix
from rayprune.models.traced import with_metadata_of
from rayprune.models.transfer import extract_subnet, write_back, zero_dropped

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "two_branch.py"
# mnasnet0_5 refuses a state dict without its per-module format versions (torch's metadata)
SOURCES = [f"{EXAMPLE}:two_branch", "torchvision:mobilenet_v3_small", "torchvision:mnasnet0_5"]
SIZE = 32


@pytest.fixture(scope="module", params=SOURCES, ids=["two_branch", "mobilenet_v3_small", "mnasnet0_5"])
def full(request):
    return models.full_spec(request.param, num_classes=10, input_size=SIZE)


def random_keep(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in models.channel_groups(spec):  # a grouped conv's groups keep half of each block
        n = max(g.divisor, g.width // 2 // g.divisor * g.divisor)
        keep[g.name] = per_block_prefix(torch.randperm(g.width, generator=gen), n, g.width, g.tiles)
    return keep


def test_extract_build_load_write_back_and_zero(full):
    net = models.build(full, seed=0).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a misaligned channel shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    keep = random_keep(full, 0)
    sub_spec, sub_state = extract_subnet(full, state, keep)
    assert sub_spec["widths"] == {name: int(idx.numel()) for name, idx in keep.items()}

    sub = models.build(sub_spec).eval()
    sub.load_state_dict(sub_state, strict=True)

    zeroed = with_metadata_of(state)  # a state dict keeps its modules' format versions
    zeroed.update({k: v.clone() for k, v in state.items()})
    zero_dropped(full, zeroed, keep)
    net.load_state_dict(zeroed)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sub(x), net(x), rtol=1e-4, atol=1e-5)

    blank = with_metadata_of(state)
    blank.update({k: torch.zeros_like(v) for k, v in state.items()})
    write_back(full, blank, keep, sub_state)
    _, again = extract_subnet(full, blank, keep)
    for key, value in sub_state.items():
        assert torch.equal(again[key], value), key


def test_concat_axis_keeps_offsets():
    spec = models.full_spec(f"{EXAMPLE}:two_branch", num_classes=10, input_size=SIZE)
    state = models.build(spec, seed=0).state_dict()
    keep = {"left.0": torch.tensor([1, 3]), "right.0": torch.tensor([0, 7])}
    _, sub = extract_subnet(spec, state, keep)
    # mix.0's input is cat(left (16), right (8)): right's channels sit at 16 + index.
    expected = state["mix.0.weight"][:, [1, 3, 16, 23]]
    assert torch.equal(sub["mix.0.weight"], expected)


def test_build_is_seeded_and_full_widths_build_the_source_net(full):
    a, b = models.build(full, seed=3), models.build(full, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert sum(p.numel() for p in a.parameters()) == models.params(full)


def test_a_plain_dict_of_its_own_weights_loads_into_mnasnet_and_its_copies():
    """Methods copy weights as plain dicts (no per-module versions); MNASNet's loader refuses a
    missing version, so its build reads a plain dict as its own format, also after a deepcopy."""
    spec = models.full_spec("torchvision:mnasnet0_5", num_classes=10, input_size=SIZE)
    net = models.build(spec, seed=0)
    plain = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(plain)  # MNASNet alone: ValueError ("version ... None")
    copy_ = copy.deepcopy(net)
    copy_.load_state_dict({k: torch.zeros_like(v) for k, v in plain.items()})
    assert all(bool((p == 0).all()) for p in copy_.parameters())
    assert all(torch.equal(p, plain[k]) for k, p in net.named_parameters())  # the original untouched
