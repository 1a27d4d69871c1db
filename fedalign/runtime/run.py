"""The federated run shared by ``fedalign sft`` and ``fedalign dpo``: recipe -> data -> partition -> rounds
-> adapter -> evaluation. A :class:`Task` (:mod:`fedalign.runtime.sft`, :mod:`fedalign.runtime.dpo`)
supplies what differs: how data is loaded, which TRL trainer runs a visit, what is evaluated.

Everything that can be wrong with the inputs (recipe, model, data, partition) is found before the run
directory is created, so a refused run leaves nothing behind. The run directory then holds:

- ``recipe.yaml`` (resolved, overrides applied) and ``versions.json``;
- ``partition.json`` (client -> row ids, plus rows dropped by truncation or skipped as bad, and why);
- ``metrics.jsonl`` (see :mod:`fedalign.runtime.metrics`) and ``loss.png``;
- ``checkpoints/round-NNNNN/`` (global adapter in safetensors + server state), ``clients/`` (idle
  clients' state);
- ``private/`` (owner-only): the DP keys, client-private metrics and the privacy ledgers (see
  :mod:`fedalign.runtime.metrics` for what is public and what is not);
- ``adapter/``: the final adapter as a standard PEFT folder, with the tokenizer (or processor) and its
  chat template.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

from fedalign import algorithms
from fedalign.data.partition import make_partition
from fedalign.errors import DataError, RecipeError, RunInterrupted
from fedalign.models.adapter import AdapterSlots
from fedalign.models.loading import (
    LoadedModel,
    check_model_reachable,
    is_vision_language,
    load_model,
    resolve_device,
)
from fedalign.privacy.randomness import RunSecrets, make_private_dir
from fedalign.recipe import Recipe
from fedalign.runtime.faults import FaultInjector
from fedalign.runtime.federation import Federation
from fedalign.runtime.metrics import CLIENT_METRICS, PRIVATE_DIR, MetricsLog
from fedalign.runtime.privacy_plan import (
    bind_secrets,
    client_privacy,
    guarantee_note,
    plan_example_privacy,
    secrets_for,
)
from fedalign.runtime.report import plot_losses, print_summary
from fedalign.runtime.state import ClientStateStore, save_checkpoint, write_text_atomic

_PACKAGES = ("fedalign", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors")


@dataclass
class RunResult:
    """A finished run; ``model`` is the in-memory PEFT model holding the final global adapter.

    ``eval_before``/``eval_after`` are the held-out losses; ``metrics_before``/``metrics_after`` every
    held-out metric the task measured (DPO adds reward accuracy, margin and the preferred-behaviour rate).
    """

    run_dir: Path
    eval_before: float | None
    eval_after: float | None
    round_losses: list[float | None]
    wall_s: float
    model: Any = None
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)


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


def _save_adapter(
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
    os.replace(staging, final)
    return final


def run_context(recipe: Recipe) -> algorithms.RunContext:
    return algorithms.RunContext(
        num_clients=recipe.federation.num_clients,
        clients_per_round=recipe.federation.clients_per_round,
        local_steps=recipe.federation.local_steps,
        learning_rate=recipe.train.learning_rate,
        seed=recipe.seed,
    )


def _progress_line(metrics: MetricsLog, recipe: Recipe, round_idx: int) -> str:
    """The progress bar's text: the clients' mean loss, or under DP (where it is client-private) ε."""
    if not recipe.privacy.enabled:
        loss = metrics.of_type("round", private=True)[-1]["loss"]
        return f"round {round_idx + 1} loss {'-' if loss is None else f'{loss:.4f}'}"
    last = metrics.of_type("round")[-1]
    epsilon = last.get("epsilon", last.get("epsilon_max"))
    return f"round {round_idx + 1} ε {epsilon:.3f}"


def run_federated(
    recipe: Recipe, task: Task, console: Console | None = None, secrets: RunSecrets | None = None
) -> RunResult:
    """Run ``recipe`` to its end. ``secrets``: the keys of an earlier DP run's private/ folder, to replay it
    exactly (its noise and sampling); by default a DP run draws fresh keys."""
    console = console or Console()
    started = time.perf_counter()
    check_output_dir(recipe.output_dir)
    algorithm = algorithms.build(recipe.algorithm, run_context(recipe))
    secrets = secrets_for(recipe, secrets)
    client_dp = client_privacy(recipe, algorithm, task.name, task.privacy_units, secrets)
    if recipe.lora.projector == "full" and not algorithm.full_tensors:
        raise RecipeError(
            f"lora.projector: 'full' trains the projector as full tensors, which {algorithm.name}'s server "
            "step (specific to LoRA factors) does not aggregate; use lora.projector: lora"
        )
    task.check(recipe, algorithm)
    check_model_reachable(recipe.model)
    task.load_data(recipe, is_vision_language(recipe.model))

    device = resolve_device(recipe.device)
    loaded = load_model(recipe.model, recipe.lora, recipe.seed, device)
    setup = task.build(recipe, loaded, console)
    trainer = setup.trainer
    dropped = set(trainer.dropped_rows)
    if not setup.kept:
        raise DataError(
            f"train.max_length={recipe.train.max_length} leaves no training row with a completion"
        )
    partition = make_partition(setup.kept, recipe.partition, recipe.federation.num_clients, recipe.seed)
    example_dp = plan_example_privacy(recipe, partition.sizes())
    if example_dp is not None:
        trainer.make_private(recipe.privacy, example_dp.sigma)

    manifest = partition.to_manifest()
    bind_secrets(secrets, manifest)

    run_dir = new_run_dir(recipe)
    private_dir = make_private_dir(run_dir / PRIVATE_DIR)
    if secrets is not None:
        secrets.save(private_dir)
    write_text_atomic(recipe.resolved_yaml(), run_dir / "recipe.yaml")
    write_text_atomic(json.dumps(package_versions(), indent=1), run_dir / "versions.json")
    manifest["dropped_rows"] = {
        "reason": "no completion token within train.max_length",
        "rows": sorted(dropped),
    }
    manifest["truncated_rows"] = {
        "reason": "completion cut by train.max_length: no end-of-sequence token (trained, counted)",
        "rows": sorted(getattr(trainer, "truncated_rows", [])),
    }
    manifest["eval_rows"] = setup.eval_ids
    manifest.update(setup.manifest)
    write_text_atomic(json.dumps(manifest), run_dir / "partition.json")

    slots = AdapterSlots(trainer.model)
    metrics = MetricsLog(run_dir / "metrics.jsonl", private_dir / CLIENT_METRICS, recipe.privacy.unit)
    federation = Federation(
        algorithm,
        slots,
        trainer,
        [trainer.rows(ids) for ids in partition.clients],
        recipe.federation,
        ClientStateStore(run_dir / "clients"),
        metrics,
        seed=recipe.seed,
        persist_optimizer=recipe.train.optimizer_state == "persist",
        device=device,
        client_dp=client_dp,
        example_dp=example_dp,
        secrets=secrets,
        faults=FaultInjector(**recipe.faults.model_dump()),
    )
    initial = slots.read()
    if algorithm.moves_base:
        initial, base_change = algorithm.init_from_base(slots.base_weights(), initial, slots.scalings())
        slots.add_to_base(base_change)
        slots.write(initial)
    glob = algorithm.init_global(initial)
    rounds = recipe.federation.rounds

    def evaluate(round_idx: int) -> dict[str, float]:
        if setup.evaluate is None:
            return {}
        slots.write(glob)
        measured = setup.evaluate(round_idx, run_dir)
        metrics.write({"type": "eval", "round": round_idx, **measured})
        return measured

    note = guarantee_note(recipe)
    plan = {
        "type": "privacy",
        "unit": recipe.privacy.unit,
        "accountant": recipe.privacy.accountant,
        "delta": recipe.privacy.delta,
        "target_epsilon": recipe.privacy.target_epsilon,
        "clip_norm": recipe.privacy.clip_norm,
        "randomness": recipe.privacy.randomness,
        **({} if note is None else {"guarantee": note}),
    }
    if client_dp is not None:
        console.print(client_dp.describe() + f"; {rounds} rounds planned")
        metrics.write({**plan, "sigma": client_dp.sigma, "q": client_dp.sample_rate})
    if example_dp is not None:
        console.print(example_dp.describe() + f"; {example_dp.planned_steps} local steps planned per client")
        metrics.write(
            {
                **plan,
                "sigma": example_dp.sigma,
                "q_max": max(example_dp.sample_rates),  # what σ was calibrated for; each q_i is private
                "planned_steps": example_dp.planned_steps,
            }
        )
        metrics.write_private({"type": "privacy", "q": example_dp.sample_rates})
    if note is not None:
        console.print(f"[bold yellow]{note}[/]")
    with console.status("held-out evaluation before training"):
        before = evaluate(0)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    loop_started = time.perf_counter()
    checkpointed = 0

    def checkpoint(done: int) -> None:
        nonlocal checkpointed
        state, ledgers = federation.server_state(done - 1), federation.private_state()
        private = None if ledgers is None else (private_dir / "checkpoints", ledgers)
        save_checkpoint(run_dir / "checkpoints", done, glob, state, recipe.checkpoint.keep_last, private)
        checkpointed = done

    try:  # SIGINT, and SIGTERM (the CLI turns it into the same), end the run here with where it stands
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("round", total=rounds)
            for round_idx in range(rounds):
                if client_dp is not None and not client_dp.budget_left_for_a_round():
                    console.print(
                        f"privacy budget: another round would take ε past {recipe.privacy.target_epsilon} "
                        f"(spent {client_dp.epsilon():.3f}); stopping after round {round_idx}"
                    )
                    rounds = round_idx
                    break
                if example_dp is not None and not example_dp.anyone_can_visit():
                    console.print(
                        "privacy budget: no client can take another visit within "
                        f"ε={recipe.privacy.target_epsilon}; stopping after round {round_idx}"
                    )
                    rounds = round_idx
                    break
                glob, _ = federation.run_round(round_idx, glob)
                if example_dp is not None:
                    ledgers = json.dumps(example_dp.to_json())
                    write_text_atomic(ledgers, private_dir / "privacy_ledgers.json", private=True)
                progress.update(bar, advance=1, description=_progress_line(metrics, recipe, round_idx))
                done = round_idx + 1
                if recipe.eval.every and done % recipe.eval.every == 0 and done < rounds:
                    evaluate(done)
                if done % recipe.checkpoint.every == 0 or done == rounds:
                    checkpoint(done)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir, checkpointed, recipe.checkpoint.keep_last) from None
    if rounds and checkpointed != rounds:  # stopped early (privacy budget): the last round is kept too
        checkpoint(rounds)
    loop_s = time.perf_counter() - loop_started
    after = evaluate(rounds)
    slots.write(glob)
    _save_adapter(
        trainer.model,
        setup.processing_class,
        run_dir,
        slots.base_weights() if algorithm.moves_base else None,
        recipe.model.adapter,
    )
    wall = time.perf_counter() - started
    timing = {"rounds_wall_s": round(loop_s, 3), "wall_s": round(wall, 2)}
    if recipe.privacy.enabled:  # under DP, how long the run took follows the secret draws
        metrics.write_private({"type": "summary", **timing})
    metrics.write(
        {
            "type": "summary",
            "rounds": rounds,
            "epsilon": (
                client_dp.epsilon()
                if client_dp is not None
                else example_dp.max_epsilon()
                if example_dp is not None
                else None
            ),
            "eval_before": before.get("eval_loss"),
            "eval_after": after.get("eval_loss"),
            "metrics_before": before,
            "metrics_after": after,
            **({} if recipe.privacy.enabled else timing),
            **({} if note is None else {"guarantee": note}),
        }
    )
    metrics.close()
    plot_losses(metrics, run_dir / "loss.png", train=not recipe.privacy.enabled)
    print_summary(console, metrics, run_dir, wall, note, private=recipe.privacy.enabled)
    return RunResult(
        run_dir=run_dir,
        eval_before=before.get("eval_loss"),
        eval_after=after.get("eval_loss"),
        round_losses=[r["loss"] for r in metrics.of_type("round", private=True)],
        wall_s=wall,
        model=trainer.model,
        metrics_before=before,
        metrics_after=after,
    )
