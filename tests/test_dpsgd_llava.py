"""DP-SGD acceptance on a tiny LLaVA: with σ=0, the private gradient (Opacus hooks, per-example clipping)
equals a naive loop in which each example (its own image and text) is forwarded alone, clipped alone to C,
and summed. LoRA sits on the language model's q/v and the projector only; the vision tower stays frozen."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from fedalign.models.tiny_llava import LLAVA_LORA_TARGETS, build_tiny_llava
from fedalign.privacy.dpsgd import PrivateGradientStep, per_sequence_loss
from fedalign.privacy.randomness import SecretRandomness

torch.set_num_threads(1)

# (image colour, image size, prompt, completion): different colours, sizes and text lengths.
EXAMPLES = [
    ((220, 30, 30), (40, 36), "What colour is this?", " Red."),
    ((30, 200, 40), (32, 32), "Describe the picture, please.", " A plain green square, nothing else."),
    ((20, 40, 230), (48, 30), "Colour?", " It is a deep blue colour, like the sea on a clear summer day."),
    ((240, 230, 20), (33, 45), "Name the main colour of the image.", " Yellow, mostly."),
]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_llava(seed=0)[1]


def make_model() -> torch.nn.Module:
    """The tiny LLaVA with LoRA r=4 (regex targets); B is made non-zero so that A gets gradients too."""
    base, _ = build_tiny_llava(seed=0)  # fresh: get_peft_model mutates the model in place
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAVA_LORA_TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.train()


def encode(processor, examples) -> dict[str, torch.Tensor]:
    """Right-padded batch with pixel_values; labels mask the prompt (image tokens included) and padding."""
    images = [Image.new("RGB", size, colour) for colour, size, _, _ in examples]
    prompts = [f"{processor.image_token}\n{prompt}" for _, _, prompt, _ in examples]
    fulls = [p + completion for p, (_, _, _, completion) in zip(prompts, examples, strict=True)]
    batch = dict(processor(images=images, text=fulls, return_tensors="pt", padding=True))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i, prompt in enumerate(prompts):
        prompt_ids = processor(images=[images[i]], text=[prompt], return_tensors="pt")["input_ids"][0]
        assert torch.equal(batch["input_ids"][i, : len(prompt_ids)], prompt_ids)  # prompt is a token prefix
        labels[i, : len(prompt_ids)] = -100
    batch["labels"] = labels
    return batch


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainable(model)])


def naive_clipped_sum(model, processor, clip: float) -> tuple[torch.Tensor, list[float], list[torch.Tensor]]:
    """Each example forwarded alone (its own pixel_values, no padding), its gradient clipped alone, summed."""
    total, norms, grads = 0.0, [], []
    for example in EXAMPLES:
        loss = per_sequence_loss(model, encode(processor, [example])).sum()
        g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, trainable(model))])
        norms.append(float(g.norm()))
        grads.append(g)
        total = total + g * min(1.0, clip / float(g.norm()))
    return total, norms, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model().model.vision_tower


def test_lora_targets_skip_the_vision_tower() -> None:
    model = make_model()
    lora = [n for n, _ in model.named_modules() if n.endswith(("lora_A", "lora_B"))]
    assert lora and not [n for n in lora if "vision_tower" in n]
    wrapped = {n.rsplit(".", 1)[0] for n in lora}
    assert len(wrapped) == 6  # 2 layers × (q_proj, v_proj) in the LM + projector linear_1, linear_2
    assert sum("multi_modal_projector" in n for n in wrapped) == 2
    assert not [n for n, p in vision_tower(model).named_parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_example_clipping_equals_naive_loop_on_llava(processor) -> None:
    model = make_model()
    batch = encode(processor, EXAMPLES)
    assert batch["pixel_values"].shape == (len(EXAMPLES), 3, 32, 32)
    assert len(set((batch["labels"] != -100).sum(1).tolist())) == len(EXAMPLES)  # different lengths
    assert (batch["attention_mask"] == 0).any()  # some padding

    _, norms, grads = naive_clipped_sum(model, processor, math.inf)
    clip = sum(sorted(norms)[1:3]) / 2  # between two norms: some examples clipped, some not
    reference, _, _ = naive_clipped_sum(model, processor, clip)
    assert min(norms) < clip < max(norms)
    # The image reaches the loss: the projector's LoRA gradient differs between examples.
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in trainable(model)]
    projector = torch.cat(
        [g for g, n in zip(grads[0].split(sizes), names, strict=True) if "multi_modal_projector" in n]
    )
    assert float(projector.abs().max()) > 0

    with PrivateGradientStep(
        model, clip_norm=clip, noise_multiplier=0.0, unit="example", noise=SecretRandomness.fresh()
    ) as private:
        info = private.step(batch, expected_batch_size=1.0)
    err = rel_err(flat_grad(model), reference)
    print(f"LLaVA example clipping rel err: {err:.2e} (C={clip:.4g}, norms={[f'{n:.4g}' for n in norms]})")
    assert err < 1e-5
    assert info.batch_size == len(EXAMPLES) and 0 < info.clipped < len(EXAMPLES)
    assert info.clipped == sum(n > clip for n in norms)
    assert all(p.grad is None for p in vision_tower(model).parameters())
