"""What ``fedalign eval`` evaluates: a base model, a base with a PEFT adapter, or a fedalign run directory.

A run directory (``recipe.yaml`` + ``adapter/``) gives two checkpoints side by side: ``base`` (the run's
base model, with ``adapter/start_adapter/`` merged in when the run started from one, as DPO's reference
was) and ``tuned`` (the same, with FRLoRA's ``residual_base.safetensors`` loaded into the base weights and
then the run's adapter merged). Everything is checked before any model loads, so a missing model or
adapter fails in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fedalign.errors import ModelError
from fedalign.models.loading import check_model_reachable, load_base_model, load_tokenizer
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
        """Names everything that decides the weights (what response caches are keyed by)."""
        parts = [self.model.name_or_path]
        parts += [f"start={self.model.adapter}"] if self.model.adapter else []
        parts += [f"residual={self.residual_base}"] if self.residual_base else []
        parts += [f"adapter={self.adapter}"] if self.adapter else []
        return " + ".join(parts)

    def describe(self) -> dict[str, str | None]:
        return {
            "label": self.label,
            "model": self.model.name_or_path,
            "start_adapter": self.model.adapter,
            "residual_base": None if self.residual_base is None else str(self.residual_base),
            "adapter": None if self.adapter is None else str(self.adapter),
        }

    def load(self, device: torch.device):
        """(model with every adapter merged, tokenizer), in eval mode."""
        from peft import PeftModel
        from safetensors.torch import load_file

        tokenizer = load_tokenizer(self.model)
        model = load_base_model(self.model, device)
        if self.residual_base is not None:
            model.load_state_dict(load_file(str(self.residual_base)), strict=False)
        if self.adapter is not None:
            try:
                model = PeftModel.from_pretrained(model, str(self.adapter)).merge_and_unload()
            except (ValueError, RuntimeError, KeyError) as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                raise ModelError(
                    f"adapter: {str(self.adapter)!r} does not fit the base model ({first})"
                ) from None
        return model.eval(), tokenizer


def _check_adapter(path: Path, what: str) -> Path:
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{what}: {str(path)!r} is not a PEFT adapter folder (no adapter_config.json there)")
    return path


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and (path / "adapter").is_dir()


def resolve(target: str, adapter: str | None = None) -> list[Checkpoint]:
    """The checkpoints to evaluate for a command-line ``target`` (and ``--adapter``)."""
    path = Path(target).expanduser()
    if path.is_dir() and is_run_dir(path):
        if adapter is not None:
            raise ModelError(f"--adapter: {target!r} is a run directory; its adapter/ is the one evaluated")
        raw = yaml.safe_load((path / "recipe.yaml").read_text())
        section = ModelSection(**{k: v for k, v in raw["model"].items() if k != "adapter"})
        run_adapter = _check_adapter(path / "adapter", "run adapter")
        start = run_adapter / START_ADAPTER
        if start.is_dir():
            section = section.model_copy(update={"adapter": str(_check_adapter(start, "start adapter"))})
        check_model_reachable(section)
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
    return [Checkpoint("model", section, _check_adapter(Path(adapter).expanduser(), "--adapter"))]
