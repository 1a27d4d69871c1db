"""RoLoRA (Chen et al., NeurIPS 2025): rounds alternate which LoRA factor trains; only that factor goes up.

B trains on even rounds, A on odd ones, decided by the round index (the authors' code used a step counter
that can drift). With the other factor shared by every client, averaging the active one averages the
dense updates exactly: Σ wᵢBᵢA = (Σ wᵢBᵢ)A and Σ wᵢBAᵢ = B(Σ wᵢAᵢ).

Downlink: both factors. The paper's count (only the active factor) assumes every client already holds
the other factor's latest aggregate; with partial participation a sampled client may have missed the
round that changed it, so the frozen factor is sent as well. The uplink is the active factor only.
"""

from typing import Literal

from fedalign.algorithms.base import Algorithm, AlgorithmConfig, Factor, Tensors, register


class RoLoRAConfig(AlgorithmConfig):
    name: Literal["rolora"] = "rolora"
    first: Literal["B", "A"] = "B"


@register
class RoLoRA(Algorithm):
    name = "rolora"
    config_class = RoLoRAConfig

    def trainable(self, round_idx: int) -> frozenset[Factor]:
        first: Factor = self.config.first  # type: ignore[attr-defined]
        other: Factor = "A" if first == "B" else "B"
        return frozenset({first if round_idx % 2 == 0 else other, "full"})

    def broadcast(self, round_idx: int, glob: Tensors) -> Tensors:
        return dict(glob)
