"""FedAvg-LoRA (FedIT): clients train both factors; the server averages A and B separately.

Inexact as an average of updates: Σ wᵢBᵢAᵢ ≠ (Σ wᵢBᵢ)(Σ wᵢAᵢ) once clients' A differ. It is the baseline
all three papers compare against (algorithms.md §4).
"""

from typing import Literal

from fedalign.algorithms.base import Algorithm, AlgorithmConfig, register


class FedAvgConfig(AlgorithmConfig):
    name: Literal["fedavg"] = "fedavg"


@register
class FedAvg(Algorithm):
    name = "fedavg"
    config_class = FedAvgConfig
