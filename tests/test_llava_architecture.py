"""LLaVA-1.5-7B's real architecture, built on the meta device (no weights, no download): the recipe's LoRA
adapts exactly the language model's 32x2 q/v projections and the projector's two linear layers."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from fedalign.models.loading import attach_lora
from fedalign.recipe import load_recipe

from .conftest import REPO


def llava_15_7b() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(  # CLIP ViT-L/14 at 336 px
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(  # Vicuna-7B / Llama-2-7B
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _adapted(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def test_spavl_recipe_adapts_exactly_lm_qv_and_projector() -> None:
    recipe = load_recipe(REPO / "recipes" / "spavl.yaml")
    base = llava_15_7b()
    projector = base.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1024, 4096)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (4096, 4096)
    assert len(base.model.vision_tower.encoder.layers) == 24
    model = attach_lora(base, recipe.lora, recipe.seed, vision=True)
    adapted = _adapted(model)
    expected = {
        f"base_model.model.model.language_model.layers.{i}.self_attn.{p}"
        for i in range(32)
        for p in ("q_proj", "v_proj")
    } | {f"base_model.model.model.multi_modal_projector.linear_{k}" for k in (1, 2)}
    assert len(adapted) == 32 * 2 + 2 and set(adapted) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    lora_a = model.base_model.model.model.language_model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.shape == (256, 4096)


def test_full_projector_option_trains_the_projector_as_a_whole() -> None:
    recipe = load_recipe(REPO / "recipes" / "spavl.yaml", ["lora.projector=full"])
    model = attach_lora(llava_15_7b(), recipe.lora, recipe.seed, vision=True)
    adapted = _adapted(model)
    assert len(adapted) == 64 and all(".language_model." in n for n in adapted)
    full = [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    assert sorted(n.split(".modules_to_save.default.")[1] for n in full) == [
        "linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight",
    ]  # fmt: skip


def test_a_regex_reaching_into_the_vision_tower_is_refused() -> None:
    import pytest

    from fedalign.errors import ModelError

    recipe = load_recipe(REPO / "recipes" / "spavl.yaml", ["lora.target_modules=.*(q_proj|v_proj)"])
    with pytest.raises(ModelError, match="vision tower"):
        attach_lora(llava_15_7b(), recipe.lora, recipe.seed, vision=True)
