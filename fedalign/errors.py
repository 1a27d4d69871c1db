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
    """A run stopped by SIGINT or SIGTERM: where its last complete checkpoint is. A KeyboardInterrupt, so
    code that catches ``Exception`` (or ``FedalignError``) around a run does not swallow a Ctrl-C."""

    def __init__(self, run_dir: object, checkpointed: int, keep_last: int | None) -> None:
        self.run_dir, self.checkpointed = run_dir, checkpointed
        if checkpointed:
            kept = f"round {checkpointed}" + (
                f" and the {keep_last - 1} checkpoints before it"
                if keep_last and keep_last > 1
                else ""
                if keep_last == 1
                else " and every earlier round"
            )
            where = (
                f"{run_dir} keeps the checkpoints of {kept} (checkpoints/); the final adapter was not written"
            )
        else:
            where = f"{run_dir} has no finished round to keep"
        super().__init__(f"interrupted: {where}")
