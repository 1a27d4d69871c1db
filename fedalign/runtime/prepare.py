"""What a run is prepared from before its run directory exists: the task's parts (:class:`Task`,
:class:`TaskSetup`), the checks that need no file, the model and data and their partition, and the
:class:`Prepared` run that :func:`fedalign.runtime.run.run_federated` runs. :func:`prepare_local` puts the
clients in this process; :mod:`fedalign.flower.server` prepares one whose clients are on Flower nodes, and
a node prepares its clients' data with :func:`load_and_partition`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console

from fedalign import algorithms
from fedalign.data.partition import make_partition
from fedalign.errors import DataError, RecipeError
from fedalign.models.adapter import AdapterSlots
from fedalign.models.loading import (
    LoadedModel,
    check_model_reachable,
    is_vision_language,
    load_model,
    resolve_device,
)
from fedalign.privacy.mechanism import NoPrivacy
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe
from fedalign.runtime.clients import ClientSide, LocalClients, RowsByClient
from fedalign.runtime.metrics import PeakMemory
from fedalign.runtime.privacy_plan import bind_secrets, client_privacy, plan_example_privacy, secrets_for
from fedalign.runtime.state import CLIENT_STATE, ClientStateStore


@dataclass
class TaskSetup:
    """What a task hands the shared runtime once its model and trainer exist."""

    trainer: Any  # rows(ids), train(...), make_private(...), model, dropped_rows, dropped_eval_rows
    processing_class: Any  # saved with the adapter: a tokenizer or a processor
    kept: list[Any]  # training rows left for partitioning (each with row_id, origin, label)
    eval_ids: list[int]
    # held-out metrics of the adapter now in the model, given (round, run dir to write any artefact into)
    evaluate: Callable[[int, Path], dict[str, float]] | None
    manifest: dict[str, Any] = field(default_factory=dict)  # extra partition.json entries (skipped rows)


class Task(Protocol):
    """SFT or DPO: the parts of a run that differ (see :mod:`fedalign.runtime.sft`, ``.dpo``)."""

    name: str
    privacy_units: tuple[str, ...]  # the DP-SGD unit ("example" or "pair") and "client"

    def check(self, recipe: Recipe, algorithm: algorithms.Algorithm) -> None:
        """Refuse recipe combinations this task cannot run, before anything loads."""

    def load_data(self, recipe: Recipe, vision: bool) -> None:
        """Read (and validate) the training and evaluation rows; raise DataError naming a bad row."""

    def build(self, recipe: Recipe, loaded: LoadedModel, console: Console) -> TaskSetup:
        """Construct the trainer on the loaded model and say which rows are kept."""


def run_context(recipe: Recipe) -> algorithms.RunContext:
    return algorithms.RunContext(
        num_clients=recipe.federation.num_clients,
        clients_per_round=recipe.federation.clients_per_round,
        local_steps=recipe.federation.local_steps,
        learning_rate=recipe.train.learning_rate,
        seed=recipe.seed,
    )


class ClientsFactory(Protocol):
    """Builds the client side of a run once its run directory exists (its state goes in ``private_dir``)."""

    def __call__(self, privacy: NoPrivacy, private_dir: Path, memory: PeakMemory) -> ClientSide: ...


@dataclass
class Prepared:
    """Everything a run needs before its run directory exists: validated, loaded, planned.

    ``model`` holds the adapter the server starts from and saves at the end; ``clients`` builds the
    client side: here, :class:`LocalClients` over the partitioned data; on Flower, the remote clients of
    the nodes (:mod:`fedalign.flower.server`). ``transport`` is recorded in ``run.json``.
    """

    algorithm: algorithms.Algorithm
    secrets: RunSecrets | None
    client_dp: Any
    example_dp: Any
    model: Any
    processing_class: Any
    evaluate: Callable[[int, Path], dict[str, float]] | None
    clients: ClientsFactory
    manifest: dict[str, Any]
    device: torch.device
    transport: str = "local"
    # what the run discloses beyond what its ε covers (on Flower: the row counts nodes sent), said with
    # the run's other guarantee notes at its start, in its summary and in metrics.jsonl
    disclosures: list[str] = field(default_factory=list)


def prepare_local(recipe: Recipe, task: Task, console: Console, secrets: RunSecrets | None) -> Prepared:
    """Check the recipe, load data and model, partition, plan the privacy: all that can fail on the inputs
    fails here, before anything is written."""
    algorithm, secrets, client_dp = check_recipe(recipe, task, secrets)
    device, setup, partition = load_and_partition(recipe, task, console)
    trainer = setup.trainer
    example_dp = plan_example_privacy(recipe, partition.sizes())
    if example_dp is not None:
        trainer.make_private(recipe.privacy, example_dp.sigma)

    manifest = partition.to_manifest()
    bind_secrets(secrets, manifest)
    manifest["dropped_rows"] = {
        "reason": "no completion token within train.max_length",
        "rows": sorted(set(trainer.dropped_rows)),
    }
    manifest["truncated_rows"] = {
        "reason": "completion cut by train.max_length: no end-of-sequence token (trained, counted)",
        "rows": sorted(getattr(trainer, "truncated_rows", [])),
    }
    manifest["eval_rows"] = setup.eval_ids
    manifest.update(setup.manifest)

    def clients(privacy: NoPrivacy, private_dir: Path, memory: PeakMemory) -> LocalClients:
        return LocalClients(
            algorithm,
            AdapterSlots(trainer.model),
            trainer,
            RowsByClient(trainer.rows, partition.clients),
            ClientStateStore(private_dir / CLIENT_STATE),
            privacy,
            memory,
            seed=recipe.seed,
            local_steps=recipe.federation.local_steps,
            persist_optimizer=recipe.train.optimizer_state == "persist",
        )

    return Prepared(
        algorithm,
        secrets,
        client_dp,
        example_dp,
        trainer.model,
        setup.processing_class,
        setup.evaluate,
        clients,
        manifest,
        device,
    )


def check_recipe(
    recipe: Recipe, task: Task, secrets: RunSecrets | None
) -> tuple[algorithms.Algorithm, RunSecrets | None, Any]:
    """The algorithm, the DP keys and the client-level mechanism, after every check that needs no file."""
    algorithm = algorithms.build(recipe.algorithm, run_context(recipe))
    secrets = secrets_for(recipe, secrets)
    client_dp = client_privacy(recipe, algorithm, task.name, task.privacy_units, secrets)
    if recipe.lora.projector == "full" and not algorithm.full_tensors:
        raise RecipeError(
            f"lora.projector: 'full' trains the projector as full tensors, which {algorithm.name}'s server "
            "step (specific to LoRA factors) does not aggregate; use lora.projector: lora"
        )
    task.check(recipe, algorithm)
    return algorithm, secrets, client_dp


def load_and_partition(recipe: Recipe, task: Task, console: Console) -> tuple[torch.device, TaskSetup, Any]:
    """The model, the task's trainer over the data, and the data's partition into the recipe's clients
    (also what a Flower node runs, on its own copy of the data)."""
    check_model_reachable(recipe.model)
    task.load_data(recipe, is_vision_language(recipe.model))
    device = resolve_device(recipe.device)
    loaded = load_model(recipe.model, recipe.lora, recipe.seed, device)
    setup = task.build(recipe, loaded, console)
    if not setup.kept:
        raise DataError(
            f"train.max_length={recipe.train.max_length} leaves no training row with a completion"
        )
    partition = make_partition(setup.kept, recipe.partition, recipe.federation.num_clients, recipe.seed)
    return device, setup, partition
