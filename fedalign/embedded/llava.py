"""The embedded LLaVA: the pretrained tiny Llama behind a small seeded CLIP vision tower and projector.

Federated DPO on a vision-language model has to run in the CPU quickstart, and a LLaVA whose language model
is random (``fedalign.models.tiny_llava.build_tiny_llava``) cannot show that preference optimisation
works: it has no language to prefer one answer in. So the embedded LLaVA takes the language model of the
embedded tiny Llama as it is (its weights, tokenizer and chat format), adds ``<image>`` to the vocabulary
(one new row in the input embeddings and the LM head, both the mean of the existing rows, so the token
changes nothing it is not used for and is never the greedy pick), and puts LLaVA-1.5's architecture
around it: a 2-layer CLIP vision tower on 32×32 images and a two-layer GELU projector, both random under
a fixed seed. :mod:`.instruct` then tunes the language model and the projector on synthetic chat (the
shipped ``data/tiny-llava`` is that tuned model); the vision tower stays frozen throughout, as in DPO.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from fedalign.models.tiny_llava import add_image_token, build_llava_processor, init_llava

__all__ = ["build_llava"]


def _with_mean_row(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with one more row, the mean of its rows: deterministic, unlike transformers' resize."""
    return torch.cat([weight, weight.mean(0, keepdim=True)])


def build_llava(llama_dir: str | Path, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA-1.5-architecture model on the tiny Llama saved in ``llama_dir``, and its processor.

    The language model's weights are copied exactly (plus the ``<image>`` row); the vision tower and the
    projector are drawn under a forked RNG seeded with ``seed``, so the caller's global torch RNG is
    neither used nor disturbed and the build is reproducible. Returned in eval mode, float32, on the CPU.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    tokenizer.init_kwargs.pop("local_files_only", None)  # HF_HUB_OFFLINE's, not the model's
    llama = LlamaForCausalLM.from_pretrained(str(llama_dir))
    image_token_id = add_image_token(tokenizer)
    text_config = llama.config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    for key in ("architectures", "dtype", "transformers_version", "_name_or_path"):  # not the build machine
        text_config.pop(key, None)
    model = init_llava(text_config, image_token_id, seed)
    state = dict(llama.model.state_dict())
    state["embed_tokens.weight"] = _with_mean_row(state["embed_tokens.weight"])
    model.model.language_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(_with_mean_row(llama.lm_head.weight))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, build_llava_processor(tokenizer)
