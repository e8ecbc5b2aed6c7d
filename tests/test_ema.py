import torch
from torch import nn

from mnistdiff.ema import EMA


def test_ema_math_and_warmup():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 0.1))
    ema.update(model, step=1)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 0.19))
    warm = EMA(model, decay=0.999)
    assert warm.decay_at(0) == 0.1 and warm.decay_at(10**6) == 0.999
    late = EMA(model, decay=0.99, start_step=5)
    assert late.decay_at(3) == 0.0  # before start: copy the model


def test_half_life():
    ema = EMA(nn.Linear(1, 1), half_life=10, warmup=False)
    assert abs(ema.decay**10 - 0.5) < 1e-12


def test_buffers_copied_and_state_round_trip():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.5)
    model[1].running_mean.fill_(7.0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=100)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    other = EMA(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), decay=0.5)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(
        ema.model.state_dict().values(), other.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in ema.model.parameters())
