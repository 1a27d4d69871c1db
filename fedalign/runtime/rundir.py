"""A run directory: creating it, what it starts with, the final adapter, and the check a resume makes that
its inputs are still those the run started with. The layout is described in :mod:`fedalign.runtime.run`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedalign.errors import RecipeError, RunNotResumable
from fedalign.privacy.randomness import RunSecrets, make_private_dir
from fedalign.recipe import Recipe
from fedalign.runtime.inputs import changed_inputs, input_fingerprints
from fedalign.runtime.metrics import PRIVATE_DIR
from fedalign.runtime.state import FORMAT_VERSION, RUN_INFO, write_text_atomic

INPUTS = "inputs.json"
_PACKAGES = ("fedalign", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda"] = torch.version.cuda or "none"
    return versions


def check_output_dir(output_dir: str) -> None:
    """Fail in one line, before any model or data loads, when the run directory could not be created under
    ``output_dir``: a path through a file, or a folder this user may not write. Creates nothing."""
    path = Path(output_dir).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"output_dir: {output_dir!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"output_dir: {output_dir!r}: {existing} is not writable by this user")


def new_run_dir(recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(recipe.output_dir) / f"{recipe.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


RESIDUAL_BASE = "residual_base.safetensors"
START_ADAPTER = "start_adapter"


def save_adapter(
    model,
    tokenizer,
    run_dir: Path,
    residual: dict[str, torch.Tensor] | None = None,
    start_adapter: str | None = None,
) -> Path:
    """The final adapter as a PEFT folder (with the tokenizer and chat template).

    For algorithms that move the base weights (FRLoRA), ``residual_base.safetensors`` holds the adapted
    modules' base weights under the base model's own parameter names: load them into the base
    (``base.load_state_dict(load_file(path), strict=False)``) before ``PeftModel.from_pretrained``.
    A run that started from ``model.adapter`` ships a copy of it in ``start_adapter/``: merge it into the
    base first (``PeftModel.from_pretrained(base, "adapter/start_adapter").merge_and_unload()``).
    """
    final = run_dir / "adapter"
    staging = run_dir / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if residual is not None:
        names = {k.removeprefix("base_model.model.") + ".weight": v.contiguous() for k, v in residual.items()}
        save_file(names, staging / RESIDUAL_BASE)
    if start_adapter is not None:
        shutil.copytree(Path(start_adapter).expanduser(), staging / START_ADAPTER)
    if final.exists():  # a finished run extended by a resume
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def start_run_dir(
    recipe: Recipe, task: str, manifest: dict[str, Any], secrets: RunSecrets | None, transport: str = "local"
) -> Path:
    """Create the run directory and write what a run starts with; ``run.json`` last, so that a run directory
    with it holds everything a resume reads."""
    run_dir = new_run_dir(recipe)
    private_dir = make_private_dir(run_dir / PRIVATE_DIR)
    if secrets is not None:
        secrets.save(private_dir)
    write_text_atomic(recipe.resolved_yaml(), run_dir / "recipe.yaml")
    write_text_atomic(json.dumps(package_versions(), indent=1), run_dir / "versions.json")
    write_text_atomic(json.dumps(manifest), run_dir / "partition.json")
    # digests of the data and model files: private (a digest of the data confirms a guess of it)
    write_text_atomic(json.dumps(input_fingerprints(recipe)), private_dir / INPUTS, private=True)
    info = {"format_version": FORMAT_VERSION, "task": task, "transport": transport, "resumes": []}
    write_text_atomic(json.dumps(info, indent=1), run_dir / RUN_INFO)  # last: a resumable run has it all
    return run_dir


def check_same_inputs(run_dir: Path, recipe: Recipe, manifest: dict[str, Any]) -> None:
    """A resumed run must see the inputs it started with: the same model and data files, partitioned into
    the same clients."""
    try:
        recorded = json.loads((run_dir / PRIVATE_DIR / INPUTS).read_text())
    except (OSError, ValueError) as error:
        raise RunNotResumable(f"{run_dir}: private/{INPUTS} unreadable ({error})") from None
    changed = changed_inputs(recorded, recipe) if isinstance(recorded, dict) else [f"private/{INPUTS}"]
    if changed:
        raise RunNotResumable(
            f"{run_dir}: {', '.join(changed)}: the files changed since the run started; a resume continues "
            "only on the inputs the run started with"
        )
    try:
        partition = json.loads((run_dir / "partition.json").read_text())
    except (OSError, ValueError) as error:
        raise RunNotResumable(f"{run_dir}: partition.json unreadable ({error})") from None
    if not isinstance(partition, dict) or partition.get("clients") != json.loads(
        json.dumps(manifest["clients"])
    ):
        raise RunNotResumable(
            f"{run_dir}: the data no longer partitions as when the run started (partition.json differs); "
            "a resume needs the same data files as the run's recipe.yaml names"
        )
