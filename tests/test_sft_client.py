"""What TRL's tokenization gives the federated trainer: prompt masked, Dolly context kept, EOS trained."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedalign.client.sft import SFTLocalTrainer, VisitBatches
from fedalign.data.examples import Example
from fedalign.models.loading import attach_lora, load_tokenizer
from fedalign.recipe import LoraSection, ModelSection, TrainSection

from .conftest import TINY_MODEL


@pytest.fixture(scope="module")
def local_trainer() -> SFTLocalTrainer:
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(TINY_MODEL)))
    model = attach_lora(AutoModelForCausalLM.from_pretrained(TINY_MODEL), LoraSection(r=4, alpha=8), seed=0)
    rows = [
        Example(
            row_id=7,
            origin="t:1",
            prompt=[{"role": "user", "content": "Who owns the kite?\n\nContext:\nMara owns the red kite."}],
            completion=[{"role": "assistant", "content": "Mara owns the kite."}],
        ),
        Example(
            row_id=9,
            origin="t:2",
            prompt=[{"role": "user", "content": "word " * 200}],
            completion=[{"role": "assistant", "content": "too late"}],
        ),
    ]
    records = [r.to_record() for r in rows]
    return SFTLocalTrainer(model, tokenizer, TrainSection(max_length=64), records, seed=0, use_cpu=True)


def test_prompt_is_masked_context_kept_and_eos_trained(local_trainer: SFTLocalTrainer) -> None:
    tokenizer = local_trainer.trainer.processing_class
    row = local_trainer.rows([7])[0]
    ids, labels = row["input_ids"], row["labels"]
    prompt = [t for t, label in zip(ids, labels, strict=True) if label == -100]
    completion = [label for label in labels if label != -100]
    assert "Context:\nMara owns the red kite." in tokenizer.decode(prompt)
    assert completion[-1] == tokenizer.eos_token_id == ids[-1]
    assert tokenizer.decode(completion[:-1]).strip() == "Mara owns the kite."


def test_rows_left_without_completion_are_reported_not_hidden(local_trainer: SFTLocalTrainer) -> None:
    assert local_trainer.dropped_rows == [9]


def test_visit_batches_cover_every_row_before_repeating() -> None:
    batches = list(VisitBatches(5, 2, 5, torch.Generator().manual_seed(0)))
    flat = [i for b in batches for i in b]
    assert len(batches) == 5 and all(len(b) == 2 for b in batches)
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4]
    again = list(VisitBatches(5, 2, 5, torch.Generator().manual_seed(0)))
    assert again == batches


@pytest.mark.parametrize(("rows", "batch"), [(5, 4), (7, 3), (4, 4), (3, 1)])
def test_visit_batches_never_hold_a_row_twice_and_each_pass_is_a_permutation(rows: int, batch: int) -> None:
    """A pass that ends inside a batch used to start the next pass with rows already in that batch (n = 5,
    batch 4: 263 of 600 batches held a duplicate)."""
    batches = list(VisitBatches(rows, batch, 600, torch.Generator().manual_seed(1)))
    assert all(len(b) == len(set(b)) == batch for b in batches)
    flat = [i for b in batches for i in b]
    passes = [flat[i : i + rows] for i in range(0, len(flat) - rows + 1, rows)]
    assert all(sorted(p) == list(range(rows)) for p in passes)


def test_gradient_checkpointing_is_really_enabled_and_changes_no_result() -> None:
    """We never call ``Trainer.train()``, which is where transformers turns checkpointing on."""
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(TINY_MODEL)))
    records = [
        Example(
            row_id=i,
            origin=f"t:{i}",
            prompt=[{"role": "user", "content": f"Say {i}."}],
            completion=[{"role": "assistant", "content": f"{i} it is."}],
        ).to_record()
        for i in range(4)
    ]
    updates = []
    for checkpointing in (False, True):
        model = attach_lora(
            AutoModelForCausalLM.from_pretrained(TINY_MODEL), LoraSection(r=4, alpha=8), seed=0
        )
        train = TrainSection(max_length=64, batch_size=4, gradient_checkpointing=checkpointing)
        local = SFTLocalTrainer(model, tokenizer, train, records, seed=0, use_cpu=True)
        assert local.model.get_base_model().is_gradient_checkpointing is checkpointing
        result = local.train(local.rows([0, 1, 2, 3]), 2, torch.Generator().manual_seed(0))
        updates.append(
            (result.losses, [p.detach().clone() for p in local.model.parameters() if p.requires_grad])
        )
    (plain_losses, plain_params), (ckpt_losses, ckpt_params) = updates
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_params, ckpt_params, strict=True))
