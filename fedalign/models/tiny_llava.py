"""An offline tiny LLaVA (CLIP vision tower + projector + small Llama) and its processor.

Built from configs, never downloaded, exactly as stack-notes §2 describes: a 2-layer CLIP vision tower on
32×32 images with 8×8 patches (16 patch features, so ``<image>`` expands to 16 tokens), a small Llama text
model, and a ``LlavaProcessor`` on the embedded tiny-Llama tokenizer with ``<image>`` added as a special
token. Only the PIL image processor is used, so torchvision is not needed.

:func:`build_tiny_llava` gives a *random* model for the DP-SGD tests; the embedded default
(:mod:`fedalign.embedded.llava`) reuses :func:`vision_config` and :func:`build_llava_processor` around the
pretrained tiny Llama. :data:`LLAVA_LORA_TARGETS` is the LoRA target regex from §2: the plain list
``["q_proj", "v_proj", "linear_1", "linear_2"]`` also matches the vision tower's q/v projections, whereas
the regex hits only the language model's q/v and the projector, leaving the vision tower frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8

LLAVA_LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)|.*multi_modal_projector\.(linear_1|linear_2)"
"""PEFT ``target_modules`` regex: LM q_proj/v_proj and projector linear_1/linear_2, never the vision tower."""

# The ChatML-style template of the tiny Llama (fedalign.models.templates.CHATML), extended to the structured
# content TRL's vision collators produce ({"type": "image"} / {"type": "text"} parts): an image part renders
# as "<image>\n" (the processor expands it to one token per patch feature), text parts as their text. Plain
# string content renders exactly as CHATML does, so text rows look the same to the text and vision models.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n"
    "{% for part in parts %}{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tiny-llama"


def vision_config() -> CLIPVisionConfig:
    """The 2-layer, 32-wide CLIP vision tower: 16 patches of 8×8 on a 32×32 image (a few tens of k params)."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<image>`` as a special token (one new id at the end of the vocabulary) and return its id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_llava_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """A ``LlavaProcessor`` on ``tokenizer`` (which must already hold ``<image>``) for the tiny vision tower.

    The PIL image processor resizes and centre-crops to 32×32 and normalises with CLIP's statistics; the
    processor expands each ``<image>`` to 16 tokens (17 features minus the CLS token the "default" strategy
    drops). The tokenizer gets :data:`LLAVA_CHAT_TEMPLATE` too, so tokenizer and processor, saved together
    in one folder (one ``chat_template.jinja``), render conversations alike.
    """
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def init_llava(
    text_config: LlamaConfig | dict, image_token_id: int, seed: int
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA-1.5 (the :func:`vision_config` tower, LLaVA's feature choice) on the
    given language-model config, drawn under a forked RNG seeded with ``seed``: the caller's global torch
    RNG is neither used nor disturbed, and the same arguments give the same weights."""
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(config)


def build_tiny_llava(
    tokenizer_dir: str | Path = _DEFAULT_TOKENIZER, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA (about 244k parameters) and a processor that matches it.

    ``tokenizer_dir`` holds the tiny-Llama tokenizer; ``<image>`` is added to it as a special token. Weights
    are drawn under a forked RNG seeded with ``seed``, so the caller's global torch RNG is neither used nor
    disturbed. The model is returned in eval mode, in float32, on the CPU.
    """
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.init_kwargs.pop("local_files_only", None)  # HF_HUB_OFFLINE's, not the model's
    image_token_id = add_image_token(tokenizer)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = init_llava(text, image_token_id, seed)
    model.eval()
    return model, build_llava_processor(tokenizer)
