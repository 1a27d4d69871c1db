"""``fedalign flower simulate``: a recipe over N virtual nodes on Flower's simulation engine (Ray).

The nodes are Flower's, with their own messages, state and processes; only the machine is shared. Each
node p hosts clients p, p+N, p+2N, ... and takes their share of the recipe's data; its state (clients'
state, ledgers, keys, pending visits) is in ``<state_dir>/node-p/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from fedalign.errors import FedalignError, RecipeError
from fedalign.recipe import Recipe
from fedalign.runtime.run import RunResult


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with its local paths absolute (Flower's workers need not share this working directory)."""

    def absolute(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value is not None and Path(value).exists() else value

    model = recipe.model.model_copy(
        update={
            "name_or_path": absolute(recipe.model.name_or_path),
            "adapter": absolute(recipe.model.adapter),
        }
    )
    data = recipe.data.model_copy(
        update={
            "path": absolute(recipe.data.path),
            "eval_path": absolute(recipe.data.eval_path),
            "image_root": absolute(recipe.data.image_root),
        }
    )
    output = str(Path(recipe.output_dir).resolve())
    return recipe.model_copy(update={"model": model, "data": data, "output_dir": output})


def refuse_on_flower(recipe: Recipe) -> None:
    """What fedalign cannot run on Flower yet, refused before any engine starts."""
    from fedalign import algorithms

    if algorithms.registry()[recipe.algorithm.name].moves_base:
        raise RecipeError(
            f"algorithm: {recipe.algorithm.name} moves the base weights on every node; fedalign flower does "
            "not run it yet"
        )


def simulate(
    recipe: Recipe, task: str, nodes: int, state_dir: Path | None = None, console: Console | None = None
) -> RunResult:
    from flwr.simulation import run_simulation

    from fedalign.flower.apps import client_app, server_app

    if nodes < 1 or nodes > recipe.federation.num_clients:
        raise RecipeError(
            f"--nodes {nodes}: between 1 and federation.num_clients={recipe.federation.num_clients} "
            "(each node hosts at least one client)"
        )
    refuse_on_flower(recipe)
    recipe = absolute_paths(recipe)
    state_root = (state_dir or Path(recipe.output_dir) / "flower-nodes").resolve()
    server = server_app(recipe, task, nodes)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server,
        client_app(state_root),
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if server.error is not None:  # type: ignore[attr-defined]
        raise server.error  # type: ignore[attr-defined]
    result = server.result  # type: ignore[attr-defined]
    if result is None:
        raise FedalignError("the Flower simulation ended without a result; see its log above")
    return result
