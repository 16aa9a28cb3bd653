"""Exponential moving average of a network's weights, kept in fp32 beside the training weights.

Samples are drawn with the EMA weights (decay 0.9999 in most diffusion work). The shadow copy is separate
from the training weights, so resuming a run restores both and never loads one into the other (a known
bug of open implementations).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Shadow of every floating-point parameter and buffer of a module, updated as
    shadow <- decay * shadow + (1 - decay) * weight. Integer buffers (counters) are copied as they are."""

    def __init__(self, model: nn.Module, *, warmup: bool = True) -> None:
        self.warmup = warmup
        """Cap the decay at (1 + step) / (10 + step) so early averages are not dominated by the random init."""
        self.step = 0
        """Number of updates done so far."""
        self.shadow: dict[str, torch.Tensor] = {
            name: self._to_shadow(value) for name, value in _tensors(model).items()
        }

    @staticmethod
    def _to_shadow(value: torch.Tensor) -> torch.Tensor:
        value = value.detach()
        return value.float().clone() if value.is_floating_point() else value.clone()

    def effective_decay(self, decay: float) -> float:
        """The decay the next update uses (warm-up applied)."""
        if self.warmup:
            return min(decay, (1 + self.step) / (10 + self.step))
        return decay

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """Fold the model's current weights into the average."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        d = self.effective_decay(decay)
        tensors = _tensors(model)
        self._check_names(tensors.keys(), "model")
        for name, value in tensors.items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().to(device=shadow.device, dtype=shadow.dtype), 1.0 - d)
            else:
                shadow.copy_(value)
        self.step += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the average (cast to each weight's dtype and device)."""
        tensors = _tensors(model)
        self._check_names(tensors.keys(), "model")
        for name, value in tensors.items():
            value.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the EMA weights inside the block; the training weights are restored on exit."""
        backup = {name: value.detach().clone() for name, value in _tensors(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in _tensors(model).items():
                    value.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the module's own names, plus the step count under `ema.step`
        (a plain tensor dict, so it can go into a safetensors file)."""
        return {**self.shadow, STEP_KEY: torch.tensor(self.step, dtype=torch.int64)}

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights alone: a state dict the module itself can load."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if STEP_KEY not in state:
            raise KeyError(f"EMA state has no {STEP_KEY!r} entry; was it saved with EMA.state_dict()?")
        step = state.pop(STEP_KEY)
        self._check_names(state.keys(), "state dict")
        for name, value in state.items():
            self.shadow[name].copy_(value)
        self.step = int(step)

    def _check_names(self, names: object, what: str) -> None:
        names = set(names)
        if names != set(self.shadow):
            missing = sorted(set(self.shadow) - names)[:5]
            extra = sorted(names - set(self.shadow))[:5]
            raise KeyError(f"{what} does not match the EMA's tensors: missing {missing}, unexpected {extra} (first 5)")


STEP_KEY = "ema.step"
"""Key of the update counter in `EMA.state_dict()`."""


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, under their state-dict names."""
    state_names = set(model.state_dict().keys())
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return {name: value for name, value in named.items() if name in state_names}
