"""Named, in-place access to a PEFT model's LoRA tensors.

The runtime keeps one model per process and swaps clients' adapters by copying tensors into the existing
parameters (no re-wrapping, no reload). Keys are PEFT state-dict names without the adapter name, the same
names ``get_peft_model_state_dict`` and saved adapters use, so messages and checkpoints are portable.
"""

from __future__ import annotations

import torch
from torch import nn

from fedalign.algorithms.base import Factor, Tensors, factor_of


class AdapterSlots:
    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        marker = f".{adapter_name}."
        self.params: dict[str, nn.Parameter] = {
            name.replace(marker, "."): param
            for name, param in model.named_parameters()
            if factor_of(name) is not None and marker in name
        }
        if not self.params:
            raise ValueError("the model has no LoRA parameters to federate")
        from peft.tuners.lora import LoraLayer

        # The adapted modules' frozen base weights and LoRA scales, for algorithms moving the base (FRLoRA).
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        self.adapter_name = adapter_name

    def base_weights(self) -> Tensors:
        """A CPU copy of every adapted module's base weight, keyed by module name."""
        return {
            n: m.base_layer.weight.detach().to("cpu", torch.float32, copy=True)
            for n, m in self.layers.items()
        }

    def scalings(self) -> dict[str, float]:
        return {n: float(m.scaling[self.adapter_name]) for n, m in self.layers.items()}

    @torch.no_grad()
    def add_to_base(self, deltas: Tensors) -> None:
        """W += delta for the named modules' base weights (in place: every client of this process sees it)."""
        for name, delta in deltas.items():
            weight = self.layers[name].base_layer.weight
            weight.add_(delta.to(weight.device, weight.dtype))

    def keys(self) -> list[str]:
        return list(self.params)

    def read(self, keys: list[str] | None = None) -> Tensors:
        """A CPU copy of the adapter (or of ``keys``), detached from the model."""
        names = self.params if keys is None else keys
        return {k: self.params[k].detach().to("cpu", copy=True) for k in names}

    @torch.no_grad()
    def write(self, tensors: Tensors) -> None:
        unknown = set(tensors) - set(self.params)
        if unknown:
            raise KeyError(f"not LoRA tensors of this model: {sorted(unknown)[:3]}")
        for key, value in tensors.items():
            param = self.params[key]
            if param.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
            param.copy_(value)

    def set_trainable(self, factors: frozenset[Factor]) -> None:
        for key, param in self.params.items():
            param.requires_grad_(factor_of(key) in factors)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.params.items() if p.requires_grad}
