"""The round loop: a small function over the run's state, with the points where a run may stop.

Each iteration asks the privacy mechanism whether its budget pays for another round, runs the round
(:meth:`fedalign.runtime.federation.Federation.run_round`), evaluates and checkpoints on schedule. The
end of a round is the *safe point*: a first SIGINT or SIGTERM asks the loop to stop there, with a
checkpoint of the round just finished; a second SIGINT aborts at once and leaves the last complete
checkpoint. Either way the run directory and the command that resumes it are printed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console

from fedalign.algorithms.base import Tensors
from fedalign.errors import RunInterrupted
from fedalign.recipe import Recipe

KILL_HOOK = "FEDALIGN_TEST_KILL"  # "after-round:K" or "checkpoint:K": SIGKILL this process there (tests)


@dataclass(frozen=True)
class Schedule:
    """What a resume may change: how many rounds, and when to evaluate and checkpoint."""

    rounds: int
    checkpoint_every: int
    keep_last: int | None
    eval_every: int | None

    @classmethod
    def of(cls, recipe: Recipe) -> Schedule:
        return cls(
            recipe.federation.rounds, recipe.checkpoint.every, recipe.checkpoint.keep_last, recipe.eval.every
        )


def kill_point(where: str, rounds_done: int) -> None:
    """A test's SIGKILL at a named point of the loop (``FEDALIGN_TEST_KILL=where:K``): a real kill, no
    cleanup, exactly what an out-of-memory killer or a pre-empted node does."""
    if os.environ.get(KILL_HOOK) == f"{where}:{rounds_done}":
        os.kill(os.getpid(), signal.SIGKILL)


class SafeStop:
    """SIGINT/SIGTERM handling during the loop: the first asks for a stop at the end of the round, the
    second SIGINT aborts at once (a KeyboardInterrupt from wherever the run is)."""

    def __init__(self, console: Console) -> None:
        self.console, self.requested, self.signal_name = console, False, ""

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name
        self.console.print(
            f"[bold yellow]{self.signal_name}: stopping at the end of this round, with a checkpoint "
            "(Ctrl-C again to abort now and keep the last complete checkpoint)[/]"
        )

    @contextmanager
    def installed(self) -> Iterator[SafeStop]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; a run elsewhere stops as its caller decides
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def run_rounds(
    glob: Tensors,
    start: int,
    schedule: Schedule,
    *,
    run_round: Callable[[int, Tensors], Tensors],
    stop_reason: Callable[[], str | None],
    evaluate: Callable[[int, Tensors], None],
    checkpoint: Callable[[int, Tensors], None],
    progress: Callable[[int], None],
    console: Console,
    run_dir: object,
) -> tuple[Tensors, int]:
    """Rounds ``start+1 .. schedule.rounds``; returns the global adapter and the rounds done (fewer when
    the privacy budget ran out, after checkpointing the last one)."""
    checkpointed = start
    done = start
    stop = SafeStop(console)
    try:
        with stop.installed():
            while done < schedule.rounds:
                reason = stop_reason()
                if reason is not None:
                    console.print(f"privacy budget: {reason}; stopping after round {done}")
                    break
                glob = run_round(done, glob)
                done += 1
                progress(done)
                kill_point("after-round", done)
                if schedule.eval_every and done % schedule.eval_every == 0 and done < schedule.rounds:
                    evaluate(done, glob)
                if done % schedule.checkpoint_every == 0 or done == schedule.rounds:
                    checkpoint(done, glob)
                    checkpointed = done
                if stop.requested:  # the safe point: this round is checkpointed before the run stops
                    if checkpointed != done:
                        checkpoint(done, glob)
                        checkpointed = done
                    raise RunInterrupted(run_dir, checkpointed, aborted=False, signal_name=stop.signal_name)
    except KeyboardInterrupt as error:
        if isinstance(error, RunInterrupted):
            raise
        raise RunInterrupted(run_dir, checkpointed, aborted=True) from None
    if done != checkpointed:  # stopped early (privacy budget): the last round is kept too
        checkpoint(done, glob)
    return glob, done
