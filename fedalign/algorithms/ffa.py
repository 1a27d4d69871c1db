"""FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared random initialisation, only B trains.

Because every client shares the same A, averaging B averages the dense updates exactly:
Σ wᵢBᵢA = (Σ wᵢBᵢ)A. Only B travels in either direction; clients derive A from the shared initialisation.
"""

from typing import Literal

from fedalign.algorithms.base import Algorithm, AlgorithmConfig, Factor, register


class FFAConfig(AlgorithmConfig):
    name: Literal["ffa"] = "ffa"


@register
class FFA(Algorithm):
    name = "ffa"
    config_class = FFAConfig

    def trainable(self, round_idx: int) -> frozenset[Factor]:
        return frozenset({"B", "full"})
