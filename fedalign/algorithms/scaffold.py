"""SCAFFOLD (Karimireddy et al., ICML 2020) on the trainable LoRA tensors.

Each local step's gradient is corrected by (c − cᵢ): the server's control variate minus the client's
own, which the client keeps in its state between visits (on disk). After K local steps at learning rate η
the client sets cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K·η) (option II of the paper, x the adapter it received, yᵢ the one
it trained) and uploads yᵢ and Δcᵢ = cᵢ⁺ − cᵢ. The server averages the adapters (FedAvg-LoRA) and moves c
by (m/N)·Σ wᵢΔcᵢ: the paper's (1/N)·ΣΔcᵢ with the run's aggregation weights in place of 1/m. With zero
variates (the first round) this is FedAvg-LoRA exactly. Option II assumes SGD; with AdamW, the default
local optimizer here as in the FedASK and OpenFedLLM code, the correction is the same heuristic they use.
"""

from typing import Literal

import torch

from fedalign.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientState,
    GradientTerm,
    Tensors,
    register,
    select,
)

_C = "::scaffold_c"  # a control variate (the server's in messages, the client's own in its state)
_DC = "::scaffold_dc"  # the change of a client's variate, uploaded
_X = "::scaffold_x"  # the adapter a client received, kept for the duration of its visit


class ScaffoldConfig(AlgorithmConfig):
    name: Literal["scaffold"] = "scaffold"


@register
class Scaffold(Algorithm):
    name = "scaffold"
    config_class = ScaffoldConfig
    client_level_dp = False  # the upload carries control-variate changes, not only trained factors

    def init_global(self, initial: Tensors) -> Tensors:
        self.control = {k: torch.zeros_like(v) for k, v in initial.items()}  # server state: c
        return super().init_global(initial)

    def broadcast(self, round_idx: int, glob: Tensors) -> Tensors:
        factors = select(glob, self.trainable(round_idx))
        return {**factors, **{k + _C: self.control[k] for k in factors}}

    def local_start(self, round_idx: int, received: Tensors, state: ClientState) -> Tensors:
        factors = {k: v for k, v in received.items() if not k.endswith(_C)}
        state.tensors.update(
            {k + _X: v for k, v in factors.items()} | {k + _C + "@server": received[k + _C] for k in factors}
        )
        return factors

    def gradient_term(self, round_idx: int, received: Tensors, state: ClientState) -> GradientTerm | None:
        def correction(key: str, value: torch.Tensor) -> torch.Tensor:
            own = state.tensors.get(key + _C, torch.zeros_like(received[key]))
            return (received[key + _C] - own).to(value.device, value.dtype)

        return correction

    def client_upload(
        self, stage: int, round_idx: int, trained: Tensors, reply: Tensors, state: ClientState
    ) -> Tensors:
        """Update the client's variate, cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K·η), and upload yᵢ with Δcᵢ."""
        scale = 1.0 / (self.context.local_steps * self.context.learning_rate)
        upload: Tensors = {}
        for key, value in select(trained, self.trainable(round_idx)).items():
            own = state.tensors.get(key + _C, torch.zeros_like(value))
            new = own - state.tensors[key + _C + "@server"] + (state.tensors[key + _X] - value) * scale
            upload[key], upload[key + _DC] = value, new - own
            state.tensors[key + _C] = new
        return upload

    def local_end(self, round_idx: int, trained: Tensors, state: ClientState) -> ClientState:
        """Keep only the client's own variates between visits."""
        state.tensors = {k: v for k, v in state.tensors.items() if k.endswith(_C)}
        return state

    def state_dict(self) -> Tensors:
        return {k + _C: v for k, v in self.control.items()}

    def load_state_dict(self, state: Tensors) -> None:
        if set(state) != {k + _C for k in self.control}:
            raise ValueError("SCAFFOLD state: the control variate's keys do not match the adapter's")
        self.control = {k.removesuffix(_C): v.clone() for k, v in state.items()}

    def begin_aggregation(self, round_idx: int, survivors: int) -> None:
        self._survivors = survivors  # the Δc sum is over these (their weights renormalised) only

    def server_step(self, stage: int, round_idx: int, summed: Tensors, glob: Tensors) -> Tensors:
        survivors = getattr(self, "_survivors", self.context.clients_per_round)
        share = survivors / self.context.num_clients
        for key in list(summed):
            if key.endswith(_DC):
                base = key.removesuffix(_DC)
                self.control[base] = self.control[base] + share * summed.pop(key)
        return super().server_step(stage, round_idx, summed, glob)
