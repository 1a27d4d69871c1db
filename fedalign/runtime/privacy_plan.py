"""The privacy side of a run, decided before anything loads: which mechanism (client-level DP-FedAvg, or
example/pair-level DP-SGD planned over the partition), the keys its noise and sampling draw from, and what
its ε does not promise. :func:`fedalign.runtime.run.run_federated` calls these at named points."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedalign import algorithms
from fedalign.errors import DataError, RecipeError
from fedalign.privacy.client_level import ClientLevelDP
from fedalign.privacy.example_level import ExampleLevelDP
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe


def client_privacy(
    recipe: Recipe,
    algorithm: algorithms.Algorithm,
    task: str,
    task_units: tuple[str, ...],
    secrets: RunSecrets | None,
) -> ClientLevelDP | None:
    """The client-level mechanism, if any; refuses a unit the task (``fedalign <task>``, whose privacy
    units are ``task_units``) does not have, before anything loads."""
    unit = recipe.privacy.unit
    if unit != "none" and unit not in task_units:
        what = {"pair": "protects DPO preference pairs", "example": "protects SFT examples"}.get(unit, "")
        raise RecipeError(
            f"privacy.unit: {unit!r} {what}; use {' or '.join(repr(u) for u in task_units)} "
            f"with fedalign {task}"
        )
    if unit == "client":
        assert secrets is not None
        return ClientLevelDP(recipe.privacy, recipe.federation, secrets.server, algorithm)
    return None


def plan_example_privacy(recipe: Recipe, client_sizes: list[int]) -> ExampleLevelDP | None:
    """DP-SGD inside each client, per example (SFT) or per preference pair (DPO): same accounting."""
    if recipe.privacy.unit not in ("example", "pair"):
        return None
    smallest = min(client_sizes)
    if recipe.privacy.delta >= 1 / smallest:
        raise RecipeError(
            f"privacy.delta: must be < 1/n for every client's n (smallest client has {smallest} "
            f"{'pairs' if recipe.privacy.unit == 'pair' else 'rows'}, "
            f"got {recipe.privacy.delta})"
        )
    return ExampleLevelDP.plan(recipe.privacy, recipe.federation, recipe.train, client_sizes)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def secrets_for(recipe: Recipe, given: RunSecrets | None) -> RunSecrets | None:
    """The keys of a DP run's noise and sampling: fresh from the OS (or from the seed when the recipe says
    ``privacy.randomness: seeded``), or ``given`` to replay exactly the run they came from (tests; resume).

    Keys are tied to their run by a digest of its recipe (and, checked once the data is partitioned, of
    its partition): the same noise on other data would let two released runs be subtracted."""
    if not recipe.privacy.enabled:
        return None
    recipe_digest = _digest(recipe.resolved_yaml())
    if given is None:
        return RunSecrets.create(
            recipe.privacy.randomness, recipe.federation.num_clients, recipe.seed, recipe_digest
        )
    if given.mode != recipe.privacy.randomness or given.fingerprint.split(":")[0] != recipe_digest:
        raise RecipeError(
            "privacy: these DP keys belong to another run (its recipe differs); keys only replay the run "
            "they came from, since the same noise on two runs could be subtracted"
        )
    return given


def bind_secrets(secrets: RunSecrets | None, partition_manifest: dict[str, Any]) -> None:
    """Add the partition's digest to fresh keys, or check a replay's keys against it."""
    if secrets is None:
        return
    digest = _digest(json.dumps([c["row_ids"] for c in partition_manifest["clients"]]))
    recipe_digest, _, bound = secrets.fingerprint.partition(":")
    if bound and bound != digest:
        raise DataError(
            "privacy: these DP keys belong to another run (its data is partitioned differently); keys only "
            "replay the run they came from"
        )
    secrets.fingerprint = f"{recipe_digest}:{digest}"


def guarantee_note(recipe: Recipe) -> str | None:
    """What a run's ε does not promise, in words (None when it is a guarantee as stated in the README)."""
    if recipe.privacy.enabled and recipe.privacy.randomness == "seeded":
        return (
            "privacy.randomness is 'seeded': the noise and sampling follow from the public seed, so this ε "
            "is no guarantee against anyone who holds the seed (recipe.yaml); for tests and research only"
        )
    return None
