"""FedASK (double-sketched federated LoRA): aggregate the products BᵢAᵢ exactly through two sketches.

Per adapted module (W ∈ R^{d×k}, rank r, sketch width s = r + p; algorithms.md §1.2), with Ω ∈ R^{k×s}
drawn N(0, 1) from a seed every party shares (so Ω never travels):

* stage 0: every client uploads ``Y = B (A Ω)`` (d×s); the server forms Q = qr(Σ wᵢYᵢ).Q and replies Q;
* stage 1: every client uploads ``P = Aᵀ (Bᵀ Q)`` (k×s), so Σ wᵢPᵢᵀ = Qᵀ (Σ wᵢBᵢAᵢ); the server takes the
  SVD Pᵀ = U S Vh and rebuilds a rank-r pair with B'A' = Q U[:, :r] diag(S[:r]) Vh[:r].

Only the weighted sums of the sketches reach the server, so this fits the linear protocol (and secure
aggregation) unchanged; no d×k matrix is ever formed. With A frozen and shared (``train_a: false``, the
paper's DP mode) Σ wᵢBᵢA has rank ≤ r, the range sketch captures it exactly for any p ≥ 0 and the
aggregation is exact. With trainable A the sum has rank up to m·r and the output is truncated to rank r, so
it is lossy: at best (s ≥ m·r) it is the best rank-r approximation of Σ wᵢBᵢAᵢ (algorithms.md §1.5).

Splitting the product into factors. The paper's ``balanced`` split is B' = Q U diag(√S), A' = diag(√S) Vh.
``scale_preserving`` (the default) keeps the same product B'A' but rescales the pair (B'·c, A'/c) so that
each module's A keeps the Frobenius norm it had before the round. Why: when A is frozen, B's gradient is
G·Aᵀ, so its size scales with ‖A‖. The balanced split puts half the spectrum of the (small) aggregated
update into A; measured in the authors' code it shrank ‖A‖_F from 6.55 to 1.50 after one round, which
shrinks the next round's B-gradients (and hence B's effective learning rate) by about 4x. Rescaling
keeps A's row space and conditioning as the paper's split sets them, but keeps the learning dynamics of B
on the scale the LoRA initialisation chose. (If the aggregate is exactly zero, the pre-round A is kept and
B is zero; the balanced split would return A = 0 there, which freezes B for good when A is frozen.)

Sketches are not the trained factors, so client-level DP (clipping the uploaded factors) does not apply.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedalign.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientState,
    Factor,
    RunContext,
    Tensors,
    register,
    select,
)

_A_TAG = ".lora_A."
_B_TAG = ".lora_B."
Y_SUFFIX = ".sketch_Y"
Q_SUFFIX = ".sketch_Q"
P_SUFFIX = ".sketch_P"


class FedASKConfig(AlgorithmConfig):
    name: Literal["fedask"] = "fedask"
    # p = 2 by default: with p = 0, AΩ is a square random r×r matrix whose occasional ill-conditioning costs
    # float32 exactness (measured at Llama-2-7B shapes: worst module 2.1e-5 at p = 0, 5.9e-6 at p = 2);
    # the paper's ablation finds p = 2-4 enough. The shipped FedASK config used s = r (p = 0).
    oversampling: int = Field(default=2, ge=0)
    seed: int = 0
    split: Literal["balanced", "scale_preserving"] = "scale_preserving"
    train_a: bool = False


def lora_pairs(tensors: Tensors) -> dict[str, tuple[str, str]]:
    """Module name -> (lora_A key, lora_B key) for every module whose A and B are both present."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in tensors:
        if _A_TAG in key:
            module, rest = key.split(_A_TAG, 1)
            b_key = f"{module}{_B_TAG}{rest}"
            if b_key in tensors:
                pairs[module] = (key, b_key)
    return pairs


def omega(seed: int, module: str, k: int, s: int) -> torch.Tensor:
    """The shared sketch Ω ∈ R^{k×s} of one module: N(0, 1), determined by (seed, module, k, s) alone."""
    digest = hashlib.sha256(f"fedask|{seed}|{module}|{k}|{s}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(k, s, generator=generator, dtype=torch.float32)


@register
class FedASK(Algorithm):
    name = "fedask"
    config_class = FedASKConfig
    full_tensors = False
    num_stages = 2
    client_level_dp: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig, context: RunContext | None = None) -> None:
        super().__init__(config, context)
        assert isinstance(config, FedASKConfig)
        self.cfg = config
        self._omegas: dict[tuple[str, int, int, torch.device], torch.Tensor] = {}

    def trainable(self, round_idx: int) -> frozenset[Factor]:
        return frozenset({"A", "B"}) if self.cfg.train_a else frozenset({"B"})

    def broadcast(self, round_idx: int, glob: Tensors) -> Tensors:
        # Both factors: the server re-based A last round, so clients must receive it even when it is frozen.
        return select(glob, {"A", "B"})

    def omega(self, module: str, k: int, rank: int, device: torch.device) -> torch.Tensor:
        s = rank + self.cfg.oversampling
        key = (module, k, s, device)
        if key not in self._omegas:
            self._omegas[key] = omega(self.cfg.seed, module, k, s).to(device)
        return self._omegas[key]

    def client_upload(
        self, stage: int, round_idx: int, trained: Tensors, reply: Tensors, state: ClientState
    ) -> Tensors:
        upload: Tensors = {}
        for module, (a_key, b_key) in lora_pairs(trained).items():
            a, b = trained[a_key].float(), trained[b_key].float()
            if stage == 0:
                upload[module + Y_SUFFIX] = b @ (a @ self.omega(module, a.shape[1], a.shape[0], a.device))
            else:
                q = reply[module + Q_SUFFIX].to(device=b.device, dtype=torch.float32)
                upload[module + P_SUFFIX] = a.T @ (b.T @ q)
        return upload

    def server_step(self, stage: int, round_idx: int, summed: Tensors, glob: Tensors) -> Tensors:
        if stage == 0:
            # The server keeps Q for stage 1 (it also goes to every client as the reply). Row-major, as
            # it arrives over a wire: QR returns it column-major, and the clients' matmuls would then take
            # another kernel in process than on a Flower node (results differing in the last bits).
            self._q = {
                module + Q_SUFFIX: torch.linalg.qr(
                    summed[module + Y_SUFFIX].float(), mode="reduced"
                ).Q.contiguous()
                for module in lora_pairs(glob)
            }
            return dict(self._q)
        new = dict(glob)
        for module, (a_key, b_key) in lora_pairs(glob).items():
            q = self._q[module + Q_SUFFIX]
            new[b_key], new[a_key] = self._rebuild(q, summed[module + P_SUFFIX], glob[a_key], glob[b_key])
        self._q = {}
        return new

    def _rebuild(
        self, q: torch.Tensor, p: torch.Tensor, a_old: torch.Tensor, b_old: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') of rank r with B'A' = Q · rank-r truncation of Pᵀ (= Qᵀ Σ wᵢBᵢAᵢ)."""
        r = a_old.shape[0]
        u, sv, vh = torch.linalg.svd(p.float().T.to(q.device), full_matrices=False)
        rho = min(r, sv.numel())
        root = sv[:rho].sqrt()
        b_new = torch.zeros(b_old.shape, dtype=torch.float32, device=q.device)
        a_new = torch.zeros(a_old.shape, dtype=torch.float32, device=q.device)
        b_new[:, :rho] = (q @ u[:, :rho]) * root
        a_new[:rho] = root[:, None] * vh[:rho]
        if self.cfg.split == "scale_preserving":
            target = a_old.float().norm()
            current = a_new.norm()
            if current > 0 and target > 0:
                c = current / target  # (B·c)(A/c) = BA, and ‖A/c‖ = ‖A_old‖
                b_new, a_new = b_new * c, a_new / c
            elif current == 0:
                # Zero aggregate (e.g. nobody moved B off zero): keep A, zero B; the product is exact.
                a_new = a_old.float().clone().to(q.device)
        return b_new.to(b_old.dtype), a_new.to(a_old.dtype)
