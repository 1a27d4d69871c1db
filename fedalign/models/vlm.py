"""LoRA placement for LLaVA-style vision-language models: the language model and the projector, never the
vision tower.

PEFT matches a list of module names anywhere in the model, so ``["q_proj", "v_proj"]`` on LLaVA also
adapts the CLIP vision tower's q/v projections (stack-notes §2). Here a list of names means *the language
model's* modules: it becomes a regex anchored on ``language_model``, to which the projector's linear
layers are added (``lora.projector: lora``, the FedASK setup), or the projector is trained fully through
PEFT's ``modules_to_save`` (``full``: it then travels as full tensors), or left frozen. A regex string is
passed through as the user wrote it, and :func:`check_vision_tower_untouched` refuses any placement, by
list or regex, that adapts or unfreezes a vision-tower parameter.
"""

from __future__ import annotations

import re

from torch import nn

from fedalign.errors import ModelError
from fedalign.recipe import LoraSection

VISION_TOWER = "vision_tower"
PROJECTOR = "multi_modal_projector"


def projector_linears(model: nn.Module) -> list[str]:
    """The projector's ``nn.Linear`` children (LLaVA-1.5: ``linear_1`` and ``linear_2``)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == PROJECTOR:
            return [child for child, m in module.named_children() if isinstance(m, nn.Linear)]
    raise ModelError(f"model: no {PROJECTOR!r} module found; only LLaVA-style models are supported")


def lora_placement(model: nn.Module, lora: LoraSection) -> tuple[str | list[str], list[str] | None]:
    """(PEFT ``target_modules``, ``modules_to_save``) for a vision-language model under ``lora``."""
    projector = lora.projector or "lora"
    if isinstance(lora.target_modules, str):
        return lora.target_modules, [PROJECTOR] if projector == "full" else None
    names = "|".join(re.escape(n) for n in lora.target_modules)
    pattern = rf".*language_model.*\.({names})"
    if projector == "lora":
        linears = "|".join(re.escape(n) for n in projector_linears(model))
        pattern += rf"|.*{PROJECTOR}\.({linears})"
    return pattern, [PROJECTOR] if projector == "full" else None


def check_vision_tower_untouched(model: nn.Module) -> None:
    """Raise ModelError if any vision-tower parameter is adapted or trainable (it must stay bit-identical)."""
    touched = [
        name
        for name, param in model.named_parameters()
        if VISION_TOWER in name and (param.requires_grad or "lora_" in name or "modules_to_save" in name)
    ]
    if touched:
        raise ModelError(
            f"lora.target_modules: adapts the vision tower ({touched[0]}, {len(touched)} tensors); "
            "the vision tower must stay frozen: list the language model's module names instead"
        )
