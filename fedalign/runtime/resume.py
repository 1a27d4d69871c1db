"""``fedalign resume RUN_DIR [overrides]``: continue a run from its last complete checkpoint.

The run continues with its own recipe (``recipe.yaml``), data, DP keys and state, so that the result is
the one an uninterrupted run would have given, bit for bit on CPU. Only the schedule may change
(:data:`SAFE_TO_CHANGE`): more rounds, checkpointing and evaluation frequency. What a privacy mechanism
planned (σ, the planned steps) stays as the run planned it: extending a DP run with a ``target_epsilon``
stops it when the budget is spent, as it would have stopped.

Rounds after the checkpoint are run again from the same state and the same randomness (the DP keys are
the run's own), so they release exactly what the lost rounds would have released: a resume costs no
privacy beyond the uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from fedalign.algorithms import registry
from fedalign.errors import RecipeError, RunNotResumable
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe, apply_override, load_recipe, validate_recipe
from fedalign.runtime.loop import Schedule
from fedalign.runtime.metrics import PRIVATE_DIR
from fedalign.runtime.run import ResumePoint, RunResult, run_federated
from fedalign.runtime.state import (
    BASE_MOVES,
    CHECKPOINTS,
    CLIENT_STATE,
    FORMAT_VERSION,
    RUN_INFO,
    BaseMoves,
    ClientStateStore,
    DamagedState,
    RoundState,
    checkpoint_dir,
    checkpoint_rounds,
    load_checkpoint,
)

SAFE_TO_CHANGE = ("federation.rounds", "checkpoint.every", "checkpoint.keep_last", "eval.every")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """``run.json``, or one line on why this folder is not a run this fedalign can resume."""
    if not run_dir.is_dir():
        raise RunNotResumable(f"{run_dir}: no such run directory")
    path = run_dir / RUN_INFO
    if not path.is_file():
        if (run_dir / "recipe.yaml").is_file():
            raise RunNotResumable(
                f"{run_dir}: written by a fedalign without resumable run state (no {RUN_INFO}); its "
                "checkpoints lack the algorithm's server state and the clients' snapshots, so it cannot "
                "continue exactly: start it again from its recipe.yaml"
            )
        raise RunNotResumable(f"{run_dir}: not a fedalign run directory (no {RUN_INFO}, no recipe.yaml)")
    try:
        info = json.loads(path.read_text())
        version, task = int(info["format_version"]), info["task"]
    except (ValueError, KeyError, TypeError, OSError):
        raise RunNotResumable(f"{path}: damaged (not the JSON a run writes)") from None
    if version > FORMAT_VERSION:
        raise RunNotResumable(
            f"{path}: run-state format {version} is newer than this fedalign reads ({FORMAT_VERSION}); "
            "upgrade fedalign to resume it"
        )
    if version < FORMAT_VERSION:
        raise RunNotResumable(
            f"{path}: run-state format {version} is older than this fedalign reads ({FORMAT_VERSION}) and "
            "has no upgrade path; start the run again from its recipe.yaml"
        )
    if task not in ("sft", "dpo"):
        raise RunNotResumable(f"{path}: unknown task {task!r}")
    if info.get("transport", "local") != "local":
        raise RunNotResumable(
            f"{run_dir}: a run on Flower nodes; fedalign resume continues runs whose clients ran in this "
            "process only (the nodes hold the clients' state); start it again with fedalign flower"
        )
    return info


def _schedule(recipe_path: Path, earlier: list[str], overrides: list[str]) -> Schedule:
    """The recipe's schedule with every earlier resume's overrides, then these."""
    raw = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    for override in earlier:
        apply_override(raw, override)
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key not in SAFE_TO_CHANGE:
            raise RecipeError(
                f"override {override!r}: {key or '(no key)'} cannot change on resume (the run would not "
                f"continue as it started); safe to change: {', '.join(SAFE_TO_CHANGE)}"
            )
        apply_override(raw, override)
    return Schedule.of(validate_recipe(raw, f"{recipe_path} with overrides"))


def _find_checkpoint(run_dir: Path, recipe: Recipe, console: Console) -> RoundState:
    """The newest checkpoint whose every part is intact; a damaged one is set aside with a warning and
    the one before is used (round 0, the run's start, when none is left)."""
    root = run_dir / CHECKPOINTS
    clients = run_dir / PRIVATE_DIR / CLIENT_STATE
    for staging in [*root.glob(".round-*"), *(clients / "checkpoints").glob(".round-*")]:
        shutil.rmtree(staging, ignore_errors=True)  # a checkpoint being written when the run died
    private_root = run_dir / PRIVATE_DIR / CHECKPOINTS if recipe.privacy.enabled else None
    store = ClientStateStore(clients)
    moves = registry()[recipe.algorithm.name].moves_base
    for rounds_done in checkpoint_rounds(root):
        try:
            state = load_checkpoint(root, rounds_done, private_root)
            if not store.has_snapshot(rounds_done):
                raise DamagedState(f"private/clients/checkpoints/round-{rounds_done:05d}: missing")
            if moves:
                BaseMoves(root / BASE_MOVES).check(rounds_done)
            return state
        except DamagedState as reason:
            folder = checkpoint_dir(root, rounds_done)
            aside, n = folder.with_name(folder.name + ".damaged"), 1
            while aside.exists():
                n += 1
                aside = folder.with_name(f"{folder.name}.damaged-{n}")
            folder.rename(aside)
            console.print(
                f"[bold yellow]warning: checkpoint {folder.name} is damaged ({escape(str(reason))}); set "
                f"aside as {aside.name}, trying the one before[/]"
            )
    return RoundState(rounds_done=0, glob={})


def resume_run(
    run_dir: str | Path, overrides: list[str] | None = None, console: Console | None = None
) -> RunResult:
    """Continue the run in ``run_dir`` (module docstring); ``overrides``: keys of :data:`SAFE_TO_CHANGE`."""
    console = console or Console()
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    recipe = load_recipe(recipe_path)
    earlier = [o for entry in info.get("resumes", []) for o in entry.get("overrides", [])]
    schedule = _schedule(recipe_path, earlier, overrides or [])
    finished = (run_dir / "adapter").is_dir()
    done_before = max(checkpoint_rounds(run_dir / CHECKPOINTS), default=0)
    if finished and schedule.rounds <= done_before:
        raise RunNotResumable(
            f"{run_dir}: finished after {done_before} rounds; to continue it, give more: "
            f"fedalign resume {run_dir} federation.rounds=N"
        )
    secrets = None
    if recipe.privacy.enabled:
        try:
            secrets = RunSecrets.load(run_dir / PRIVATE_DIR)
        except (OSError, ValueError, KeyError, TypeError):
            raise RunNotResumable(
                f"{run_dir / PRIVATE_DIR / RunSecrets.FILE}: missing or damaged; a DP run continues only "
                "with its own keys (fresh ones would not give the same run)"
            ) from None
    state = _find_checkpoint(run_dir, recipe, console)
    if schedule.rounds < state.rounds_done:
        raise RecipeError(
            f"federation.rounds: {schedule.rounds} is fewer than the {state.rounds_done} rounds already done"
        )
    if state.rounds_done == 0 and done_before:
        console.print(
            "[bold yellow]warning: no intact checkpoint is left; the run starts again from round 0[/]"
        )
    if finished:  # an extension: the final adapter and evaluation are written again at the new end
        shutil.rmtree(run_dir / "adapter")
    if info["task"] == "sft":
        from fedalign.runtime.sft import SFTTask

        task: Any = SFTTask()
    else:
        from fedalign.runtime.dpo import DPOTask

        task = DPOTask()
    point = ResumePoint(run_dir, state, schedule, list(overrides or []), extends_finished=finished)
    return run_federated(recipe, task, console, secrets, point)
