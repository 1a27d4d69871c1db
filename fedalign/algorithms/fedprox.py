"""FedProx (Li et al., MLSys 2020) on LoRA: local loss + μ/2·‖θ − θ_global‖² over the trainable LoRA tensors.

The proximal term's gradient μ(θ − θ_global) is added at every local step; aggregation is FedAvg-LoRA.
μ = 0.01 in the FedASK and FRLoRA code; with μ = 0 this is FedAvg-LoRA exactly.
"""

from typing import Literal

from pydantic import Field

from fedalign.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientState,
    GradientTerm,
    Tensors,
    register,
)


class FedProxConfig(AlgorithmConfig):
    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(default=0.01, ge=0)


@register
class FedProx(Algorithm):
    name = "fedprox"
    config_class = FedProxConfig

    def gradient_term(self, round_idx: int, received: Tensors, state: ClientState) -> GradientTerm | None:
        mu: float = self.config.mu  # type: ignore[attr-defined]
        if mu == 0:
            return None
        return lambda key, value: mu * (value - received[key].to(value.device, value.dtype))
