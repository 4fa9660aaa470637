"""EMA of weights: the update rule, both warm-ups, swapping weights in and out, and resuming."""

import pytest
import torch
from torch import nn

from ldm.nn.ema import EMA


def test_update_is_exponential_average_without_warmup():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, warmup=None)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))


@pytest.mark.parametrize(
    "warmup, t, expected",
    [("compvis", 1, 2 / 11), ("compvis", 10**6, 0.999), ("power", 1, 1 - 2 ** (-2 / 3)), (None, 1, 0.999)],
)
def test_warmup_rules(warmup, t, expected):
    ema = EMA(nn.Linear(1, 1), decay=0.999, warmup=warmup)
    ema.num_updates = t
    assert ema.current_decay() == pytest.approx(expected)


def test_update_after_step_copies_weights_first():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.99, warmup=None, update_after_step=2)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)
    assert torch.equal(ema.shadow["weight"], net.weight.detach())


def test_average_parameters_swaps_and_restores():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.5, warmup=None)
    trained = net.weight.detach().clone() + 2.0
    with torch.no_grad():
        net.weight.copy_(trained)
    ema.update(net)
    with ema.average_parameters(net):
        torch.testing.assert_close(net.weight, ema.shadow["weight"])
        assert not torch.equal(net.weight, trained)
    assert torch.equal(net.weight, trained)


def test_state_dict_round_trip_and_mismatch():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.5)
    ema.update(net)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(2, 3, bias=False)).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_equals_lerp_of_each_tensor(dtype):
    """The multi-tensor update is bit for bit `shadow.lerp_(weight.float(), 1 - decay)` per parameter,
    for fp32 and half-precision modules; frozen parameters keep their shadow."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)).to(dtype)
    net[1].weight.requires_grad_(False)
    ema = EMA(net, decay=0.9, warmup="compvis")
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.num_updates += 1  # the decay update() will use: the rule at the next update count
        decay = ema.current_decay()
        ema.num_updates -= 1
        for name, p in net.named_parameters():
            if p.requires_grad:
                expected[name].lerp_(p.detach().float(), 1.0 - decay)
        ema.update(net)
        for name, value in expected.items():
            assert torch.equal(ema.shadow[name], value), name
    assert torch.equal(ema.shadow["1.weight"], torch.ones(8))  # LayerNorm init; frozen: never averaged
