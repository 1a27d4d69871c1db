"""Pair-level DP for TRL's DPO loss: which loss types allow it, and the per-pair loss sum to clip.

A (chosen, rejected) pair is the privacy unit. Per-pair clipping is only sound if each pair's gradient
depends on that pair alone, i.e. if TRL's loss is a mean of independent per-pair terms (stack-notes §6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedalign.errors import RecipeError
from fedalign.privacy.dpsgd import Batch, LossFn

# TRL 1.16 ``DPOConfig.loss_type`` values whose per-sequence loss for pair i reads only rows i and i+B.
# Not here: ``aot`` and ``aot_unpaired`` sort log-ratios across the batch (pair i's term depends on the
# others), and ``sft`` is one token-mean over all chosen rows (each pair's weight depends on the others'
# lengths). Either would let one pair move other pairs' terms, so clipping per pair would not bound it.
PAIR_DECOMPOSABLE_LOSSES: frozenset[str] = frozenset(
    {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "apo_zero", "apo_down", "discopop", "sigmoid_norm",
    }
)  # fmt: skip


def ensure_pair_decomposable(loss_types: str | list[str]) -> None:
    """Raise RecipeError naming the first DPO loss type that couples pairs within a batch.

    Called before training so that a DP run never silently clips gradients that are not per-pair.
    """
    for loss_type in [loss_types] if isinstance(loss_types, str) else list(loss_types):
        if loss_type not in PAIR_DECOMPOSABLE_LOSSES:
            raise RecipeError(
                f"DPO loss type {loss_type!r} is not a mean of independent per-pair terms, so pair-level DP "
                f"cannot clip it; use one of {sorted(PAIR_DECOMPOSABLE_LOSSES)}"
            )


def dpo_pair_loss(trainer: Any) -> LossFn:
    """The sum of per-pair DPO losses on a [chosen; rejected] batch of 2B rows, via TRL's own compute_loss.

    TRL returns ``Σ_types w · mean_i ℓ_i``; multiplying by B gives ``Σ_i Σ_types w · ℓ_i``, whose gradient
    w.r.t. pair i's rows is pair i's own gradient. That holds only when every ``ℓ_i`` depends on pair i
    alone (:data:`PAIR_DECOMPOSABLE_LOSSES`, no MoE aux loss) and the reference log-probs come from a
    no-grad pass (TRL's default for PEFT with ``ref_model=None``), so Opacus' hooks see only the policy.
    The trainer's loss types are checked here, so a coupling loss fails before any step.
    """
    ensure_pair_decomposable(trainer.loss_types)

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return trainer.compute_loss(model, batch) * (batch["input_ids"].shape[0] // 2)

    return loss
