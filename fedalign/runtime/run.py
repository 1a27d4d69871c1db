"""The federated run shared by ``fedalign sft`` and ``fedalign dpo``: recipe -> data -> partition -> rounds
-> adapter -> evaluation. A :class:`Task` (:mod:`fedalign.runtime.sft`, :mod:`fedalign.runtime.dpo`)
supplies what differs: how data is loaded, which TRL trainer runs a visit, what is evaluated.

Everything that can be wrong with the inputs (recipe, model, data, partition) is found before the run
directory is created, so a refused run leaves nothing behind. The run directory then holds:

- ``recipe.yaml`` (resolved, overrides applied) and ``versions.json``;
- ``partition.json`` (client -> row ids, plus rows dropped by truncation or skipped as bad, and why);
- ``metrics.jsonl`` (see :mod:`fedalign.runtime.metrics`) and ``loss.png``;
- ``run.json``: the run-state format version, the task, and every resume;
- ``checkpoints/round-NNNNN/`` (global adapter, the algorithm's server state, the sampler, a manifest of
  digests; see :mod:`fedalign.runtime.state`), ``checkpoints/base_moves/`` (FRLoRA), ``private/clients/``
  (idle clients' state, snapshotted per checkpoint);
- ``private/`` (owner-only): the DP keys, client-private metrics and the privacy ledgers (see
  :mod:`fedalign.runtime.metrics` for what is public and what is not);
- ``adapter/``: the final adapter as a standard PEFT folder, with the tokenizer (or processor) and its
  chat template.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedalign.algorithms.base import Tensors
from fedalign.models.adapter import AdapterSlots
from fedalign.privacy.mechanism import ClientLevel, ExampleLevel, NoPrivacy
from fedalign.privacy.randomness import RunSecrets
from fedalign.recipe import Recipe
from fedalign.runtime.faults import FaultInjector
from fedalign.runtime.federation import Federation
from fedalign.runtime.loop import Schedule, kill_point, run_rounds
from fedalign.runtime.metrics import CLIENT_METRICS, PRIVATE_DIR, MetricsLog, PeakMemory
from fedalign.runtime.prepare import Prepared, Task, prepare_local
from fedalign.runtime.privacy_plan import (
    guarantee_note,
)
from fedalign.runtime.report import plot_losses, print_summary
from fedalign.runtime.rundir import check_output_dir, check_same_inputs, save_adapter, start_run_dir
from fedalign.runtime.state import (
    BASE_MOVES,
    CHECKPOINTS,
    CLIENT_STATE,
    RUN_INFO,
    BaseMoves,
    ClientStateStore,
    RoundState,
    save_checkpoint,
    write_text_atomic,
)


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
class ResumePoint:
    """Where a resumed run continues: its directory, the state of its last complete checkpoint, and the
    schedule (rounds, checkpointing, evaluation) it continues with."""

    run_dir: Path
    state: RoundState
    schedule: Schedule
    overrides: list[str] = field(default_factory=list)
    extends_finished: bool = False  # the run had finished: its final evaluation is not a round's


def _mechanism(recipe: Recipe, client_dp, example_dp, secrets) -> NoPrivacy:
    if client_dp is not None:
        return ClientLevel(recipe.federation, client_dp)
    if example_dp is not None:
        return ExampleLevel(recipe.federation, example_dp, secrets)
    return NoPrivacy(recipe.federation)


def _progress_line(metrics: MetricsLog, privacy: NoPrivacy, round_idx: int) -> str:
    """The progress bar's text: the clients' mean loss, or under DP (where it is client-private) ε."""
    shown = privacy.progress(metrics.of_type("round")[-1])
    if shown is not None:
        return f"round {round_idx} {shown}"
    loss = metrics.of_type("round", private=True)[-1]["loss"]
    return f"round {round_idx} loss {'-' if loss is None else f'{loss:.4f}'}"


def _open_metrics(run_dir: Path, recipe: Recipe, resume: ResumePoint | None) -> MetricsLog:
    paths = (run_dir / "metrics.jsonl", run_dir / PRIVATE_DIR / CLIENT_METRICS)
    if resume is None:
        return MetricsLog(*paths, recipe.privacy.unit)
    start, every = resume.state.rounds_done, resume.schedule.eval_every
    final_eval = resume.extends_finished and not (every and start % every == 0)
    # from round 0 (no checkpoint survived) the logs start over, as the run does
    return MetricsLog.resume(
        *paths, recipe.privacy.unit, start if start else -1, drop_eval_at=start if final_eval else None
    )


def run_federated(
    recipe: Recipe,
    task: Task,
    console: Console | None = None,
    secrets: RunSecrets | None = None,
    resume: ResumePoint | None = None,
    prepare: Callable[[Recipe, Task, Console, RunSecrets | None], Prepared] = prepare_local,
) -> RunResult:
    """Run ``recipe`` to its end. ``secrets``: the keys of an earlier DP run's private/ folder, to replay it
    exactly (its noise and sampling); by default a DP run draws fresh keys. ``resume``: continue the run
    in ``resume.run_dir`` from its checkpoint (``recipe`` and ``secrets`` are then that run's own).
    ``prepare``: where the clients are (:func:`prepare_local`: in this process)."""
    console = console or Console()
    started = time.perf_counter()
    schedule = resume.schedule if resume is not None else Schedule.of(recipe)
    if resume is None:
        check_output_dir(recipe.output_dir)
    prepared = prepare(recipe, task, console, secrets)
    algorithm, example_dp = prepared.algorithm, prepared.example_dp
    if resume is None:
        run_dir = start_run_dir(recipe, task.name, prepared.manifest, prepared.secrets, prepared.transport)
    else:
        run_dir = resume.run_dir
        check_same_inputs(run_dir, recipe, prepared.manifest)
        info = json.loads((run_dir / RUN_INFO).read_text())
        info["resumes"].append({"from_round": resume.state.rounds_done, "overrides": resume.overrides})
        write_text_atomic(json.dumps(info, indent=1), run_dir / RUN_INFO)
    private_dir = run_dir / PRIVATE_DIR
    start = 0 if resume is None else resume.state.rounds_done

    slots = AdapterSlots(prepared.model)
    privacy = _mechanism(recipe, prepared.client_dp, example_dp, prepared.secrets)
    metrics = _open_metrics(run_dir, recipe, resume)
    store = ClientStateStore(private_dir / CLIENT_STATE)  # on Flower, clients' state is on their nodes
    memory = PeakMemory(prepared.device)
    clients = prepared.clients(privacy, private_dir, memory)
    federation = Federation(
        algorithm,
        clients,
        recipe.federation,
        metrics,
        seed=recipe.seed,
        memory=memory,
        faults=FaultInjector(**recipe.faults.model_dump()),
        base_moves=BaseMoves(run_dir / CHECKPOINTS / BASE_MOVES) if algorithm.moves_base else None,
    )
    initial = slots.read()
    if algorithm.moves_base:
        initial, base_change = algorithm.init_from_base(slots.base_weights(), initial, slots.scalings())
        slots.add_to_base(base_change)
        slots.write(initial)
    glob = algorithm.init_global(initial)
    if start:
        glob = federation.restore(resume.state)  # type: ignore[union-attr]
    elif resume is not None:
        federation.restart()

    def write_ledgers() -> None:
        if example_dp is not None:  # the current ledgers, for the operator (checkpoints keep their own)
            ledgers = json.dumps(example_dp.to_json())
            write_text_atomic(ledgers, private_dir / "privacy_ledgers.json", private=True)

    def evaluate(round_idx: int, adapter: Tensors) -> dict[str, float]:
        if prepared.evaluate is None:
            return {}
        slots.write(adapter)
        measured = prepared.evaluate(round_idx, run_dir)
        metrics.write({"type": "eval", "round": round_idx, **measured})
        return measured

    def checkpoint(done: int, adapter: Tensors) -> None:
        save_checkpoint(
            run_dir / CHECKPOINTS,
            federation.state(done, adapter),
            schedule.keep_last,
            private_dir / CHECKPOINTS if recipe.privacy.enabled else None,
            store,
            before_publish=lambda: kill_point("checkpoint", done),
        )

    note = "; ".join(n for n in (guarantee_note(recipe), *prepared.disclosures) if n) or None
    if start == 0:
        _announce_privacy(recipe, privacy, metrics, console, note)
        with console.status("held-out evaluation before training"):
            before = evaluate(0, glob)
    else:
        write_ledgers()  # as of the checkpoint, not of the rounds lost after it
        before = next((e for e in metrics.of_type("eval") if e["round"] == 0), {})
        before = {k: v for k, v in before.items() if k not in ("type", "round")}
        console.print(f"resuming {run_dir} after round {start} of {schedule.rounds}")
        if note is not None:
            console.print(f"[bold yellow]{note}[/]")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    loop_started = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("round", total=schedule.rounds, completed=start)

        def after_round(done: int) -> None:
            write_ledgers()
            progress.update(bar, advance=1, description=_progress_line(metrics, privacy, done))

        glob, rounds = run_rounds(
            glob,
            start,
            schedule,
            run_round=lambda round_idx, adapter: federation.run_round(round_idx, adapter)[0],
            stop_reason=privacy.stop_reason,
            evaluate=evaluate,
            checkpoint=checkpoint,
            progress=after_round,
            console=console,
            run_dir=run_dir,
        )
    loop_s = time.perf_counter() - loop_started
    after = evaluate(rounds, glob)
    slots.write(glob)
    save_adapter(
        prepared.model,
        prepared.processing_class,
        run_dir,
        slots.base_weights() if algorithm.moves_base else None,
        recipe.model.adapter,
    )
    clients.close()  # after the adapter is saved: on Flower, it tells the nodes the last rounds' outcome
    wall = time.perf_counter() - started
    _write_summary(recipe, metrics, privacy, rounds, before, after, note, loop_s, wall)
    metrics.close()
    plot_losses(metrics, run_dir / "loss.png", train=not recipe.privacy.enabled)
    print_summary(console, metrics, run_dir, wall, note, private=recipe.privacy.enabled)
    return RunResult(
        run_dir=run_dir,
        eval_before=before.get("eval_loss"),
        eval_after=after.get("eval_loss"),
        round_losses=[r["loss"] for r in metrics.of_type("round", private=True)],
        wall_s=wall,
        model=prepared.model,
        metrics_before=before,
        metrics_after=after,
    )


def _write_summary(
    recipe: Recipe,
    metrics: MetricsLog,
    privacy: NoPrivacy,
    rounds: int,
    before: dict[str, float],
    after: dict[str, float],
    note: str | None,
    loop_s: float,
    wall: float,
) -> None:
    timing = {"rounds_wall_s": round(loop_s, 3), "wall_s": round(wall, 2)}
    if recipe.privacy.enabled:  # under DP, how long the run took follows the secret draws
        metrics.write_private({"type": "summary", **timing})
    metrics.write(
        {
            "type": "summary",
            "rounds": rounds,
            "epsilon": privacy.epsilon(),
            "eval_before": before.get("eval_loss"),
            "eval_after": after.get("eval_loss"),
            "metrics_before": before,
            "metrics_after": after,
            **({} if recipe.privacy.enabled else timing),
            **({} if note is None else {"guarantee": note}),
        }
    )


def _announce_privacy(
    recipe: Recipe, privacy: NoPrivacy, metrics: MetricsLog, console: Console, note: str | None
) -> None:
    """The mechanism's public plan (σ, sampling rate) in metrics.jsonl and on the console."""
    plan = privacy.plan_record()
    if plan is not None:
        console.print(privacy.describe())
        metrics.write(
            {
                "type": "privacy",
                "unit": recipe.privacy.unit,
                "accountant": recipe.privacy.accountant,
                "delta": recipe.privacy.delta,
                "target_epsilon": recipe.privacy.target_epsilon,
                "clip_norm": recipe.privacy.clip_norm,
                "randomness": recipe.privacy.randomness,
                **({} if note is None else {"guarantee": note}),
                **plan,
            }
        )
    if isinstance(privacy, ExampleLevel):
        metrics.write_private({"type": "privacy", "q": privacy.dp.sample_rates})
    if note is not None:
        console.print(f"[bold yellow]{note}[/]")
