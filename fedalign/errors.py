"""Errors a user can act on. The CLI prints their message as one line per problem and exits non-zero,
without a traceback; anything else is reported as an unexpected error in one line (``--debug`` shows its
traceback)."""


class FedalignError(Exception):
    """Base of user-facing errors: the message alone must say what is wrong and what to do."""


class RecipeError(FedalignError):
    """A recipe file, key or override is invalid."""


class DataError(FedalignError):
    """A dataset is missing, unreachable, or has a bad row (the message names the file and row)."""


class ModelError(FedalignError):
    """A base model or tokenizer cannot be found or loaded."""


class TrainingDiverged(FedalignError):
    """Training produced non-finite weights; nothing non-finite is saved."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM: where its last complete checkpoint is, and how to resume. A
    KeyboardInterrupt, so code that catches ``Exception`` (or ``FedalignError``) around a run does not
    swallow a Ctrl-C."""

    def __init__(
        self, run_dir: object, checkpointed: int, aborted: bool = True, signal_name: str = "SIGINT"
    ) -> None:
        self.run_dir, self.checkpointed, self.aborted = run_dir, checkpointed, aborted
        if not aborted:
            where = f"{signal_name}: stopped after round {checkpointed}, checkpointed"
        elif checkpointed:
            where = f"aborted: the last complete checkpoint is round {checkpointed}"
        else:
            where = "aborted before the first checkpoint: a resume starts from round 0"
        super().__init__(
            f"{where}; the final adapter was not written. Run directory: {run_dir}. "
            f"Resume with: fedalign resume {run_dir}"
        )


class RunNotResumable(FedalignError):
    """A run directory cannot be resumed (the message says why)."""
