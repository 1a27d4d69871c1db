"""Pair-level DP-SGD on TRL's own DPO loss: the private step against naive per-pair loops on a real
DPOTrainer (tiny Llama + LoRA, reference = base with adapters disabled), and the loss-type guard."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from fedalign.errors import RecipeError
from fedalign.models.loading import attach_lora
from fedalign.privacy.dpsgd import PrivateGradientStep
from fedalign.privacy.pairs import dpo_pair_loss, ensure_pair_decomposable
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import LoraSection

from .conftest import TINY_MODEL

torch.set_num_threads(1)

B = 4


def conv(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


ROWS = [
    {
        "prompt": conv("user", "Who owns the red kite?"),
        "chosen": conv("assistant", "Mara owns it and flies it by the sea on windy days."),
        "rejected": conv("assistant", "Nobody."),
    },
    {
        "prompt": conv("user", "What is the capital of France? Answer briefly please."),
        "chosen": conv("assistant", "Paris."),
        "rejected": conv("assistant", "It is Lyon, the city on the Rhône and the Saône rivers."),
    },
    {
        "prompt": conv("user", "Count to six."),
        "chosen": conv("assistant", "One two three four five six."),
        "rejected": conv("assistant", "One two four."),
    },
    {
        "prompt": conv("user", "Describe the weather today in a few words, as if you were a poet."),
        "chosen": conv("assistant", "Grey rain whispers on the roofs, and the wind hums low."),
        "rejected": conv("assistant", "Rain again today."),
    },
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> DPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(TINY_MODEL), LoraSection(r=4, alpha=8), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so that the policy differs from the reference and A gets gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo")),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        max_length=64,
        per_device_train_batch_size=B,
        beta=0.1,
        max_grad_norm=0.0,
    )
    out = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    assert out.loss_types == ["sigmoid"] and not out.precompute_ref_logps and out.ref_model is None
    out.model.train()
    return out


@pytest.fixture(scope="module")
def batch(trainer) -> dict[str, torch.Tensor]:
    collated = next(iter(trainer.get_train_dataloader()))
    out = {k: v.to(trainer.args.device) for k, v in collated.items() if torch.is_tensor(v)}
    assert out["input_ids"].shape[0] == 2 * B
    assert not {"ref_chosen_logps", "ref_rejected_logps"} & out.keys()  # reference computed live
    lengths = out["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # padded rows: per-pair terms see padding
    return out


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().float() for p in trainable(model)])


def trl_grad(trainer: DPOTrainer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient of TRL's compute_loss (the mean over the pairs in ``inputs``), no hooks attached."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, inputs).backward()
    grad = flat_grad(model)
    model.zero_grad(set_to_none=True)
    return grad


def one_pair(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Rows i and i+B re-stacked as a 1-pair [chosen; rejected] batch."""
    return {k: torch.cat([v[i : i + 1], v[B + i : B + i + 1]]) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def pair_grads(trainer, batch) -> list[torch.Tensor]:
    return [trl_grad(trainer, one_pair(batch, i)) for i in range(B)]


def middle_clip(pair_grads: list[torch.Tensor]) -> float:
    """Halfway between the two middle per-pair norms: two pairs clipped, two not, none on the boundary."""
    norms = torch.stack([g.norm() for g in pair_grads]).sort().values
    return float(norms[B // 2 - 1] + norms[B // 2]) / 2


def private_grad(trainer, inputs, clip: float, unit: str) -> tuple[torch.Tensor, int, int]:
    model = trainer.model
    with PrivateGradientStep(
        model, clip_norm=clip, noise_multiplier=0.0, unit=unit, noise=SecretRandomness.fresh()
    ) as private:
        info = private.step(inputs, expected_batch_size=1.0, loss_fn=dpo_pair_loss(trainer))
    grad = flat_grad(model)
    model.zero_grad(set_to_none=True)
    return grad, info.batch_size, info.clipped


def test_per_pair_clipping_matches_naive_trl_loop(trainer, batch, pair_grads):
    norms = torch.stack([g.norm() for g in pair_grads])
    clip = middle_clip(pair_grads)
    assert (norms > clip).any() and (norms < clip).any()
    naive = sum(g * (clip / g.norm()).clamp(max=1.0) for g in pair_grads)
    got, units, clipped = private_grad(trainer, batch, clip, "pair")
    assert units == B and clipped == int((norms > clip).sum())
    err = rel_err(got, naive)
    print(f"per-pair clipped sum vs naive TRL loop: rel err {err:.2e} (C={clip:.4g}, norms {norms.tolist()})")
    assert err < 1e-5


def test_unclipped_private_gradient_is_trl_gradient(trainer, batch, pair_grads):
    got, _, clipped = private_grad(trainer, batch, math.inf, "pair")
    expected = trl_grad(trainer, batch)
    assert clipped == 0
    err = rel_err(got * 1.0 / B, expected)
    err_pairs = rel_err(sum(pair_grads) / B, expected)  # TRL's batch mean really is a mean of its pairs
    print(f"C=inf private grad vs TRL batch grad: rel err {err:.2e}; mean of 1-pair grads: {err_pairs:.2e}")
    assert err < 1e-5 and err_pairs < 1e-5


def test_clipping_rows_separately_differs(trainer, batch, pair_grads):
    clip = middle_clip(pair_grads)
    per_pair, _, _ = private_grad(trainer, batch, clip, "pair")
    per_row, units, _ = private_grad(trainer, batch, clip, "example")
    assert units == 2 * B
    diff = rel_err(per_row, per_pair)
    print(f"per-row vs per-pair clipping: rel diff {diff:.2e}")
    assert diff > 1e-2


def test_loss_type_guard():
    ensure_pair_decomposable("sigmoid")
    ensure_pair_decomposable(["sigmoid", "ipo"])
    for bad, name in (("aot", "aot"), ("aot_unpaired", "aot_unpaired"), (["sigmoid", "sft"], "sft")):
        with pytest.raises(RecipeError, match=f"'{name}'"):
            ensure_pair_decomposable(bad)
