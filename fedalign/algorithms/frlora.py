"""FRLoRA (Yan et al., ICLR 2025): federated residual LoRA.

Once, from each pretrained weight W₀ = V·diag(S)·Uᵀ: B₀ = V_r·diag(√(S_r/c)), A₀ = diag(√(S_r/c))·U_rᵀ
(c = α/r, the LoRA scale) and the residual base Ŵ = W₀ − c·B₀A₀, so the model's function is unchanged at
the start.
Every round the clients train from (B₀, A₀); the server averages the factors, folds the round's change
into the base, W += c·(B̄Ā − B₀A₀), and resets LoRA to (B₀, A₀). The model after the round is W + c·B̄Ā,
exactly as if the averaged adapter stayed; the updates accumulate in W and can exceed rank r over rounds.
Both factors train (the paper's intent); ``freeze_a: true`` reproduces the released code, which froze A
(then every update stays in A₀'s row space, rank ≤ r). Aggregation weights are the run's (the released
code used uniform weights).

In this process the base is shared by all clients, so the runtime applies the base change once per round;
on separate machines every client applies c·(B̄Ā − B₀A₀) itself from the broadcast factors. The change is
handed over as rank-2r factors (c·[B̄, −B₀], [Ā; A₀]), never as a dense d×k matrix: a run keeps one such
pair per round (2r(d+k) values per module) and rebuilds the moved base from them on resume. The principal
pair (B₀, A₀) is no state: it follows from the pretrained weights by the same SVD on every start.
"""

from typing import Literal

import torch

from fedalign.algorithms.base import DOWN, UP, Algorithm, AlgorithmConfig, Factor, Tensors, register


class FRLoRAConfig(AlgorithmConfig):
    name: Literal["frlora"] = "frlora"
    freeze_a: bool = False


@register
class FRLoRA(Algorithm):
    name = "frlora"
    config_class = FRLoRAConfig
    full_tensors = False
    moves_base = True

    def trainable(self, round_idx: int) -> frozenset[Factor]:
        return frozenset({"B"}) if self.config.freeze_a else frozenset({"A", "B"})  # type: ignore[attr-defined]

    def init_from_base(
        self, base: Tensors, initial: Tensors, scalings: dict[str, float]
    ) -> tuple[Tensors, Tensors]:
        self.scalings, self.principal, self._pending = scalings, {}, {}
        adapter, deltas = {}, {}
        for module, weight in base.items():
            c, r = scalings[module], initial[f"{module}.lora_A.weight"].shape[0]
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = torch.sqrt(s[:r] / c)
            b0, a0 = u[:, :r] * root, root[:, None] * vh[:r]
            adapter[f"{module}.lora_B.weight"], adapter[f"{module}.lora_A.weight"] = b0, a0
            self.principal[module] = (b0, a0)
            deltas[module] = -c * (b0 @ a0)
        return adapter, deltas

    def server_step(self, stage: int, round_idx: int, summed: Tensors, glob: Tensors) -> Tensors:
        averaged = {**glob, **summed}
        for module, (b0, a0) in self.principal.items():
            b_bar, a_bar = averaged[f"{module}.lora_B.weight"], averaged[f"{module}.lora_A.weight"]
            # c·(B̄Ā − B₀A₀) = (c·[B̄, −B₀]) @ [Ā; A₀]: rank ≤ 2r, kept and sent as these two factors
            self._pending[module + UP] = torch.cat([b_bar.float(), -b0], dim=1) * self.scalings[module]
            self._pending[module + DOWN] = torch.cat([a_bar.float(), a0], dim=0)
        return {k: v.clone() for k, v in glob.items()}  # LoRA resets to (B₀, A₀)

    def take_base_update(self) -> Tensors:
        pending, self._pending = self._pending, {}
        return pending
