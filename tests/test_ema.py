"""EMA of weights: hand-computed averages, warm-up, buffers, state round trip, swapping."""
import pytest
import torch
from torch import nn

from imagen_core.ema import EMA


def _linear(value: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def _set(layer: nn.Linear, value: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(value)


def test_shadow_equals_hand_computed_average_without_warmup() -> None:
    model = _linear(1.0)
    ema = EMA(model, warmup=False)
    _set(model, 3.0)
    ema.update(model, decay=0.5)  # 0.5 * 1 + 0.5 * 3 = 2
    _set(model, 6.0)
    ema.update(model, decay=0.5)  # 0.5 * 2 + 0.5 * 6 = 4
    assert ema.shadow["weight"].item() == 4.0
    assert ema.step == 2


def test_warmup_caps_the_decay() -> None:
    model = _linear(0.0)
    ema = EMA(model)  # warm-up on: decay_k = min(0.9, (1 + k) / (10 + k))
    _set(model, 10.0)
    ema.update(model, decay=0.9)  # decay 1/10: 0.1 * 0 + 0.9 * 10 = 9
    assert ema.shadow["weight"].item() == pytest.approx(9.0)
    _set(model, 20.0)
    ema.update(model, decay=0.9)  # decay 2/11: 2/11 * 9 + 9/11 * 20 = 198/11 = 18
    assert ema.shadow["weight"].item() == pytest.approx(18.0)
    assert ema.effective_decay(0.9) == pytest.approx(3 / 12)
    assert ema.effective_decay(0.1) == 0.1  # below the cap: unchanged


def test_float_buffers_averaged_integer_buffers_copied_and_shadow_is_fp32() -> None:
    model = nn.BatchNorm1d(2).to(torch.bfloat16)
    ema = EMA(model, warmup=False)
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if k != "num_batches_tracked")
    with torch.no_grad():
        model.running_mean.fill_(4.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model, decay=0.75)  # 0.75 * 0 + 0.25 * 4 = 1
    assert torch.equal(ema.shadow["running_mean"], torch.ones(2))
    assert ema.shadow["num_batches_tracked"].item() == 7


def test_state_round_trip_and_copy_to() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    ema = EMA(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, decay=0.99)
    restored = EMA(nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4)))
    restored.load_state_dict(ema.state_dict())
    assert restored.step == 3
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())
    target = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    restored.copy_to(target)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in ema.weights().items())


def test_swap_uses_ema_weights_inside_and_restores_after() -> None:
    model = _linear(1.0)
    ema = EMA(model, warmup=False)
    _set(model, 5.0)
    ema.update(model, decay=0.5)  # shadow 3
    x = torch.ones(1, 1)
    with ema.swap(model):
        assert model(x).item() == 3.0
    assert model(x).item() == 5.0


def test_mismatched_module_is_refused() -> None:
    ema = EMA(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="missing \\['bias'\\]"):
        ema.update(nn.Linear(2, 2, bias=False), decay=0.9)
    with pytest.raises(KeyError, match="ema.step"):
        ema.load_state_dict(ema.weights())
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\]"):
        ema.update(nn.Linear(2, 2), decay=1.5)
