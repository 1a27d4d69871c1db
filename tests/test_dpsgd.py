"""DP-SGD on LoRA: per-unit clipping against naive per-example loops, noise scale, empty Poisson draws,
the opacus#820 guard and the checkpointing refusal, all on the tiny Llama with a q/v LoRA adapter."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from fedalign.models.loading import attach_lora
from fedalign.privacy.dpsgd import (
    PrivateGradientStep,
    assert_only_lora_changed,
    per_sequence_loss,
    poisson_batches,
    snapshot,
)
from fedalign.privacy.randomness import SecretRandomness
from fedalign.recipe import LoraSection

from .conftest import TINY_MODEL

torch.set_num_threads(1)

TEXTS = [
    "Mara owns the red kite and flies it on windy days by the sea.",
    "Who owns the kite?",
    "The quick brown fox jumps over the lazy dog near the old river bank at dawn.",
    "Paris is the capital of France.",
    "One two three four five six.",
    "Rain again today.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[dict]:
    """Rows of different lengths with the first third masked as prompt, like TRL's tokenized rows."""
    out = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        cut = max(1, len(ids) // 3)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


@pytest.fixture(scope="module")
def collate(tokenizer) -> DataCollatorForLanguageModeling:
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)


def make_model(fused: bool = False) -> torch.nn.Module:
    """The tiny Llama with LoRA r=4 on q/v; B is made non-zero so that A gets gradients too."""
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    model = attach_lora(base, LoraSection(r=4, alpha=8), seed=0)
    if fused:
        add_fused_lm_head(model.get_base_model())  # what SFTTrainer/DPOTrainer do
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.train()


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainable(model)])


def grad_of(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, trainable(model))])


def naive_clipped_sum(
    model, units: list[list[dict]], clip: float, collate
) -> tuple[torch.Tensor, list[float]]:
    """Each unit's rows forwarded one at a time (no padding), their gradients summed, clipped alone."""
    total, norms = 0.0, []
    for unit in units:
        g = sum(grad_of(model, per_sequence_loss(model, collate([row])).sum()) for row in unit)
        norms.append(float(g.norm()))
        total = total + g * min(1.0, clip / float(g.norm()))
    return total, norms


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def step_for(model, clip: float, sigma: float = 0.0, unit: str = "example", seed: int = 0):
    return PrivateGradientStep(
        model,
        clip_norm=clip,
        noise_multiplier=sigma,
        unit=unit,
        noise=SecretRandomness.from_seed(seed),
    )


@pytest.mark.parametrize("fused", [False, True])
def test_per_sequence_loss_matches_each_row_alone(fused, rows, collate) -> None:
    model = make_model(fused)
    empty = {"input_ids": rows[0]["input_ids"], "labels": [-100] * len(rows[0]["input_ids"])}
    batch = collate([*rows, empty])
    head_calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    losses = per_sequence_loss(model, batch)
    handle.remove()
    assert len(head_calls) == (0 if fused else 1)  # the fused head never builds (rows, T, vocab) logits
    assert losses.shape == (len(rows) + 1,)
    for i, row in enumerate(rows):
        alone = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        assert abs(float(losses[i].detach()) - float(alone.detach())) < 1e-5
    # DPO batches carry completion_mask instead of labels
    dpo = {k: v for k, v in batch.items() if k != "labels"} | {
        "completion_mask": (batch["labels"] != -100).long()
    }
    assert torch.allclose(per_sequence_loss(model, dpo), losses, atol=1e-6)
    assert float(losses[-1]) == 0.0  # no completion token: zero loss, zero gradient, no NaN
    g = grad_of(model, losses[-1])
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


@pytest.mark.parametrize("fused", [False, True])
def test_example_clipping_equals_naive_loop(fused, rows, collate) -> None:
    model = make_model(fused)
    _, norms = naive_clipped_sum(model, [[r] for r in rows], math.inf, collate)
    clip = sum(sorted(norms)[2:4]) / 2  # between two norms: some examples clipped, some not
    reference, _ = naive_clipped_sum(model, [[r] for r in rows], clip, collate)
    assert min(norms) < clip < max(norms)
    with step_for(model, clip) as private:
        info = private.step(collate(rows), expected_batch_size=4.5)
    err = rel_err(flat_grad(model) * 4.5, reference)
    print(f"example clipping rel err (fused={fused}): {err:.2e}")
    assert err < 1e-5
    assert info.batch_size == len(rows) and 0 < info.clipped < len(rows)
    assert info.clipped == sum(n > clip for n in norms)
    assert abs(info.mean_loss - float(per_sequence_loss(model, collate(rows)).mean())) < 1e-5


def test_micro_batches_of_one_draw_are_clipped_alone_and_noised_once(rows, collate) -> None:
    model = make_model()
    with step_for(model, 0.3, sigma=0.5, seed=7) as private:
        whole = private.step(collate(rows), expected_batch_size=5.0)
        expected = flat_grad(model)
    with step_for(model, 0.3, sigma=0.5, seed=7) as private:
        parts = private.step([collate(rows[:2]), collate(rows[2:])], expected_batch_size=5.0)
    assert rel_err(flat_grad(model), expected) < 1e-5
    assert (parts.batch_size, parts.clipped) == (whole.batch_size, whole.clipped)
    assert abs(parts.loss_sum - whole.loss_sum) < 1e-4


def test_no_clip_no_noise_is_the_plain_gradient(rows, collate) -> None:
    model = make_model()
    plain = grad_of(model, per_sequence_loss(model, collate(rows)).sum()) / 2.5
    with step_for(model, math.inf) as private:
        info = private.step(collate(rows), expected_batch_size=2.5)
    err = rel_err(flat_grad(model), plain)
    print(f"C=inf rel err: {err:.2e}")
    assert err < 1e-5 and info.clipped == 0


def test_pair_unit_clips_chosen_and_rejected_jointly(rows, collate) -> None:
    model = make_model()
    chosen, rejected = rows[:3], rows[3:]
    _, norms = naive_clipped_sum(
        model, [[c, r] for c, r in zip(chosen, rejected, strict=True)], math.inf, collate
    )
    clip = sum(sorted(norms)[1:3]) / 2
    reference, _ = naive_clipped_sum(
        model, [[c, r] for c, r in zip(chosen, rejected, strict=True)], clip, collate
    )
    with step_for(model, clip, unit="pair") as private:
        info = private.step(collate(chosen + rejected), expected_batch_size=3.0)  # TRL's [chosen; rejected]
    err = rel_err(flat_grad(model) * 3.0, reference)
    print(f"pair clipping rel err: {err:.2e}")
    assert err < 1e-5
    assert info.batch_size == 3 and info.clipped == 1
    # Clipping the six rows separately would be a different (and twice as sensitive) gradient.
    rowwise, _ = naive_clipped_sum(model, [[r] for r in chosen + rejected], clip, collate)
    assert rel_err(rowwise, reference) > 1e-2


def test_removing_one_example_leaves_the_others_unchanged(rows, collate) -> None:
    def token_mean(model, inputs):  # HF/TRL's normalisation: one mean over every token of the batch
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:])

    model = make_model()
    longest = max(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    others = [r for i, r in enumerate(rows) if i != longest]  # also shortens the padded length
    with step_for(model, 1.0) as private:
        for loss_fn, same in ((per_sequence_loss, True), (token_mean, False)):
            full, _ = private.unit_gradients(collate(rows), loss_fn)
            fewer, _ = private.unit_gradients(collate(others), loss_fn)
            kept = [i for i in range(len(rows)) if i != longest]
            a = torch.cat([g[kept].flatten(1) for g in full], dim=1)
            b = torch.cat([g.flatten(1) for g in fewer], dim=1)
            worst = float(((a - b).norm(dim=1) / b.norm(dim=1)).max())
            print(f"{loss_fn.__name__}: max change of another example's gradient {worst:.2e}")
            assert (worst < 1e-5) if same else (worst > 1e-2)


def test_noise_std_is_sigma_c_over_expected_batch_size(rows, collate) -> None:
    model, batch, clip, sigma, expected = make_model(), collate(rows[:2]), 0.05, 0.8, 4.0
    with step_for(model, clip) as private:
        private.step(batch, expected_batch_size=expected)
        clean = flat_grad(model)
    with step_for(model, clip, sigma, seed=3) as private:
        noises = []
        for _ in range(100):
            private.step(batch, expected_batch_size=expected)
            noises.append(flat_grad(model) - clean)
    ratio = float(torch.stack(noises).std()) / (sigma * clip / expected)
    print(f"noise std / (sigma C / (q n)): {ratio:.4f} over {len(noises)} steps x {clean.numel()} elements")
    assert abs(ratio - 1) < 0.05
    with step_for(model, clip, sigma, seed=3) as again:  # the owned generator alone decides the noise
        again.step(batch, expected_batch_size=expected)
        assert torch.allclose(flat_grad(model) - clean, noises[0], atol=1e-7)


def test_empty_poisson_batch_is_a_noise_only_step() -> None:
    model, calls = make_model(), []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with step_for(model, 0.1, sigma=1.5) as private:
        for empty in (None, []):
            info = private.step(empty, expected_batch_size=2.0)
            g = flat_grad(model)
            assert abs(float(g.std()) / (1.5 * 0.1 / 2.0) - 1) < 0.05 and abs(float(g.mean())) < 3e-3
            assert info.batch_size == 0 and math.isnan(info.mean_loss) and info.clipped_fraction == 0.0
    handle.remove()
    assert calls == []


def test_poisson_batches_vary_average_q_n_and_are_reproducible() -> None:
    key = SecretRandomness.fresh()
    sizes = [len(b) for b in poisson_batches(200, 0.05, 400, key)]
    assert abs(sum(sizes) / len(sizes) - 10.0) < 1.0 and len(set(sizes)) > 5
    small = list(poisson_batches(20, 0.05, 50, key))
    assert [] in small and all(b == sorted(set(b)) and all(0 <= i < 20 for i in b) for b in small)
    assert small == list(poisson_batches(20, 0.05, 50, key))  # the key's holder can replay them
    assert small != list(poisson_batches(20, 0.05, 50, SecretRandomness.fresh()))
    with pytest.raises(ValueError):
        poisson_batches(20, 1.5, 1, key)


def test_opacus_820_guard(rows, collate) -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-3)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="trainable tensors unchanged"):
        assert_only_lora_changed(before, model)  # nothing stepped yet
    with step_for(model, 0.1, sigma=1.0) as private:
        private.step(collate(rows), expected_batch_size=4.0)
    optimizer.step()
    assert_only_lora_changed(before, model)
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match=r"frozen tensors changed \['.*layers\.0\.self_attn\.q_proj"):
        assert_only_lora_changed(before, model)


def test_non_reentrant_checkpointing_is_refused_reentrant_is_exact(rows, collate) -> None:
    model = make_model()
    with step_for(model, 0.2) as private:
        private.step(collate(rows), expected_batch_size=3.0)
        expected = flat_grad(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="non-reentrant activation checkpointing"):
        step_for(model, 0.2)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with step_for(model, 0.2) as private:
        private.step(collate(rows), expected_batch_size=3.0)
    assert rel_err(flat_grad(model), expected) < 1e-5


def test_no_clip_no_noise_equals_trls_own_sft_gradient(tokenizer, rows, collate, tmp_path) -> None:
    """For one sequence, TRL's batch token mean is that sequence's own mean: the gradients must agree."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = make_model()
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows[:1]), processing_class=tokenizer
    )
    batch = collate(rows[:1])
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, dict(batch), num_items)
    trl_grad = flat_grad(trainer.model).clone()
    trainer.model.zero_grad(set_to_none=True)
    with step_for(trainer.model, clip=math.inf) as private:
        private.step(dict(batch), expected_batch_size=1.0)
    assert rel_err(flat_grad(trainer.model), trl_grad) < 1e-5
