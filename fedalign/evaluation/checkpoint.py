"""What ``fedalign eval`` evaluates: a base model, a base with a PEFT adapter, or a fedalign run directory.

A run directory (``recipe.yaml`` + ``adapter/``) gives two checkpoints side by side: ``base`` (the run's
base model, with ``adapter/start_adapter/`` merged in when the run started from one, as DPO's reference
was) and ``tuned`` (the same, with FRLoRA's ``residual_base.safetensors`` loaded into the base weights and
then the run's adapter merged). Everything is checked before any model loads, so a missing model or
adapter fails in one line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from fedalign.errors import ModelError
from fedalign.models.loading import (
    check_adapter_fits,
    check_model_reachable,
    is_vision_language,
    load_base_model,
    load_processor,
    load_tokenizer,
    peft_detail,
)
from fedalign.recipe import ModelSection

RESIDUAL_BASE = "residual_base.safetensors"
START_ADAPTER = "start_adapter"


@dataclass(frozen=True)
class Checkpoint:
    label: str  # "base", "tuned" or "model"
    model: ModelSection  # the base (its ``adapter``: a start adapter merged first)
    adapter: Path | None = None
    residual_base: Path | None = None

    @property
    def id(self) -> str:
        """Names everything that decides the weights (what response caches are keyed by): the base (with
        its revision and dtype) and a digest of every adapter or residual file, so a retrained adapter in
        the same folder never reuses the old answers."""
        parts = [self.model.name_or_path, f"revision={self.model.revision}", f"dtype={self.model.dtype}"]
        parts += [f"start={_digest(Path(self.model.adapter))}"] if self.model.adapter else []
        parts += [f"residual={_digest(self.residual_base)}"] if self.residual_base else []
        parts += [f"adapter={_digest(self.adapter)}"] if self.adapter else []
        return " + ".join(parts)

    def describe(self) -> dict[str, str | None]:
        return {
            "label": self.label,
            "model": self.model.name_or_path,
            "start_adapter": self.model.adapter,
            "residual_base": None if self.residual_base is None else str(self.residual_base),
            "adapter": None if self.adapter is None else str(self.adapter),
        }

    @property
    def vision(self) -> bool:
        return is_vision_language(self.model)

    def load(self, device: torch.device):
        """(model with every adapter merged, tokenizer or a vision-language model's processor), in eval
        mode."""
        from peft import PeftModel
        from safetensors.torch import load_file

        vision = self.vision
        tokenizer = load_processor(self.model) if vision else load_tokenizer(self.model)
        model = load_base_model(self.model, device, vision=vision)
        if self.residual_base is not None:
            try:
                unexpected = model.load_state_dict(load_file(str(self.residual_base)), strict=False)[1]
            except RuntimeError as error:  # shapes that do not fit
                first = (str(error).strip().splitlines() or ["shapes differ"])[-1].strip()[:200]
                raise ModelError(f"{self.residual_base}: does not fit the base model ({first})") from None
            if unexpected:
                raise ModelError(f"{self.residual_base}: weights the base model lacks ({unexpected[0]})")
        if self.adapter is not None:
            check_adapter_fits(model, self.adapter, "adapter")
            try:
                model = PeftModel.from_pretrained(model, str(self.adapter)).merge_and_unload()
            except (ValueError, RuntimeError, KeyError) as error:
                first = peft_detail(error)
                raise ModelError(
                    f"adapter: {str(self.adapter)!r} does not fit the base model ({first})"
                ) from None
        return model.eval(), tokenizer


def _digest(path: Path) -> str:
    """sha256 (first 16 hex) of a file, or of a folder's weight and config files."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".json"))
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _check_adapter(path: Path, what: str) -> Path:
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{what}: {str(path)!r} is not a PEFT adapter folder (no adapter_config.json there)")
    return path


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and (path / "adapter").is_dir()


def resolve(target: str, adapter: str | None = None, text_only: bool = True) -> list[Checkpoint]:
    """The checkpoints to evaluate for a command-line ``target`` (and ``--adapter``); ``text_only``
    refuses a vision-language run (the text benchmarks)."""
    path = Path(target).expanduser()
    if path.is_dir() and is_run_dir(path):
        if adapter is not None:
            raise ModelError(f"--adapter: {target!r} is a run directory; its adapter/ is the one evaluated")
        section, started_from = _run_model(path)
        run_adapter = _check_adapter(path / "adapter", "run adapter")
        start = run_adapter / START_ADAPTER
        if start.is_dir():
            section = section.model_copy(update={"adapter": str(_check_adapter(start, "start adapter"))})
        elif started_from:
            raise ModelError(
                f"{path}: the run started from an adapter, but adapter/{START_ADAPTER}/ is missing"
            )
        check_model_reachable(section)
        if text_only and is_vision_language(section):
            raise ModelError(f"{target!r}: a vision-language run; GSM8K and GSM-hard evaluate text models")
        residual = run_adapter / RESIDUAL_BASE
        return [
            Checkpoint("base", section),
            Checkpoint("tuned", section, run_adapter, residual if residual.is_file() else None),
        ]
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise ModelError(
            f"{target!r} is an adapter folder: give the base model, and this folder with --adapter"
        )
    section = ModelSection(name_or_path=target)
    check_model_reachable(section)
    if adapter is None:
        return [Checkpoint("model", section)]
    folder = _check_adapter(Path(adapter).expanduser(), "--adapter")
    if (folder / RESIDUAL_BASE).is_file() or (folder / START_ADAPTER).is_dir():
        raise ModelError(
            f"--adapter: {adapter!r} is a run's adapter that needs its {RESIDUAL_BASE} or {START_ADAPTER}/ "
            "applied too: give the run directory as TARGET instead"
        )
    return [Checkpoint("tuned", section, folder)]


def _run_model(run: Path) -> tuple[ModelSection, bool]:
    """The run's base model section (without its start adapter) and whether it started from one."""
    try:
        raw = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
        model = dict(raw["model"])
        started_from = model.pop("adapter", None) is not None
        return ModelSection(**model), started_from
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, ValidationError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ModelError(f"{run / 'recipe.yaml'}: not a readable fedalign recipe ({first})") from None
