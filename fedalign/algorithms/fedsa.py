"""FedSA-LoRA (Guo et al., ICLR 2025): A is shared, B is personal and never leaves its client.

Clients train both factors; only A is uploaded and averaged. Each client's B lives in its own state (on
disk between visits, see :mod:`fedalign.runtime.state`) and comes back when the client is sampled again;
a client's first visit starts from the shared initial B (zeros in standard LoRA). The global adapter
therefore holds the averaged A and the initial B: evaluating it alone measures the shared part only, and
each client's personal model is that A with the B in its state file.
"""

from typing import Literal

from fedalign.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientState,
    Factor,
    Tensors,
    register,
    select,
)


class FedSAConfig(AlgorithmConfig):
    name: Literal["fedsa"] = "fedsa"


@register
class FedSA(Algorithm):
    name = "fedsa"
    config_class = FedSAConfig

    def init_global(self, initial: Tensors) -> Tensors:
        self._initial_b = {k: v.clone() for k, v in select(initial, {"B"}).items()}
        return super().init_global(initial)

    def broadcast(self, round_idx: int, glob: Tensors) -> Tensors:
        return select(glob, {"A", "full"})

    def local_start(self, round_idx: int, received: Tensors, state: ClientState) -> Tensors:
        own_b = select(state.tensors, {"B"}) or self._initial_b
        return {**received, **own_b}

    def uploaded_factors(self, round_idx: int) -> frozenset[Factor]:
        return frozenset({"A", "full"})

    def local_end(self, round_idx: int, trained: Tensors, state: ClientState) -> ClientState:
        state.tensors = {**state.tensors, **select(trained, {"B"})}
        return state
