"""Load a base model once per process and attach the recipe's LoRA adapter to it.

Reachability is checked before anything heavy happens, so a hub id on an offline machine (or a typo in a
local path) stops the run at once with one line that says how to point the recipe at a local copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedalign.errors import ModelError
from fedalign.hub import hub_unreachable_reason, looks_local
from fedalign.models.templates import resolve_chat_template
from fedalign.recipe import LoraSection, ModelSection

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: 'cuda' was asked for but no CUDA device is visible; use device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def check_model_reachable(section: ModelSection) -> None:
    """Raise a one-line :class:`ModelError` unless the model can be loaded from disk or the hub."""
    path = section.name_or_path
    if looks_local(path):
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"model.name_or_path: {path!r} is not a model folder (no config.json there); "
                "point it at a folder written by save_pretrained or at a hub id"
            )
        return
    reason = hub_unreachable_reason(path, "model", section.revision)
    if reason is not None:
        local = "./models/" + path.split("/")[-1].lower()
        raise ModelError(
            f"model.name_or_path: {path!r} is not a local folder and cannot be fetched: {reason}. "
            f"Download it elsewhere (huggingface-cli download {path} --local-dir {local}), copy it here "
            f"and set model.name_or_path={local}"
        )


@dataclass
class LoadedModel:
    model: PeftModel
    tokenizer: object  # a transformers tokenizer (class names vary across versions: do not check them)
    device: torch.device


def load_tokenizer(section: ModelSection):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(section.name_or_path, revision=section.revision)
    tokenizer.chat_template = resolve_chat_template(section.chat_template, tokenizer.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(section: ModelSection, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, object] = {"revision": section.revision}
    if section.dtype != "auto":
        kwargs["dtype"] = _DTYPES[section.dtype]
    if section.attn_implementation is not None:
        kwargs["attn_implementation"] = section.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(section.name_or_path, **kwargs)
    return model.to(device)


def attach_lora(base, section: LoraSection, seed: int) -> PeftModel:
    """Wrap ``base`` with a LoRA adapter whose initial A is a function of ``seed`` alone.

    Every client, in this process or on another machine, derives the same initial adapter from the seed,
    which is what lets FFA-LoRA send only B. The global RNG is left as it was.
    """
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(base, config)
        except ValueError as error:
            first = str(error).splitlines()[0]
            raise ModelError(f"lora.target_modules: {first}") from None


def load_model(model: ModelSection, lora: LoraSection, seed: int, device: torch.device) -> LoadedModel:
    check_model_reachable(model)
    tokenizer = load_tokenizer(model)
    base = load_base_model(model, device)
    return LoadedModel(model=attach_lora(base, lora, seed), tokenizer=tokenizer, device=device)
